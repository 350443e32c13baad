//! Zero-copy message model: [`Message`] → [`Segment`] → [`Field`] →
//! [`Repetition`] → [`Component`] → [`Subcomponent`].
//!
//! All positions use HL7 numbering and start at 1. For the header segments
//! MSH, FHS and BHS, field 1 is the field separator itself and field 2 the
//! encoding characters, so `msh.field(3)` is MSH-3 (sending application)
//! exactly as in the standard. Fields 1 and 2 of these segments are
//! "opaque": they are never split into components and never unescaped.

use std::borrow::Cow;
use std::ops::Range;

use crate::encoding::{Delimiters, is_terminator};
use crate::error::ParseError;
use crate::escape;

/// Splits `input` into segment lines: `(content range, range including
/// the terminator)`. CR, LF and CRLF all end a segment; empty lines are
/// skipped; a missing final terminator is fine.
pub(crate) fn segment_lines(
    input: &[u8],
) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        loop {
            let rest = input.get(pos..)?;
            if rest.is_empty() {
                return None;
            }
            let start = pos;
            let len = rest
                .iter()
                .position(|&b| is_terminator(b))
                .unwrap_or(rest.len());
            let end = start.saturating_add(len);
            let mut next = end;
            match input.get(end) {
                Some(b'\r') => {
                    next = next.saturating_add(1);
                    if input.get(next) == Some(&b'\n') {
                        next = next.saturating_add(1);
                    }
                }
                Some(b'\n') => next = next.saturating_add(1),
                _ => {}
            }
            pos = next;
            if len > 0 {
                return Some((start..end, start..next));
            }
        }
    })
}

/// True for the header segments whose field 1 is the field separator.
fn is_header_id(id: &[u8]) -> bool {
    matches!(id, b"MSH" | b"FHS" | b"BHS")
}

/// One segment: its id and its fields, borrowed from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    raw: &'a [u8],
    delims: Delimiters,
    /// `fields[0]` is the segment id, `fields[n]` is field n.
    fields: Vec<&'a [u8]>,
    /// Number of leading opaque fields (2 for MSH/FHS/BHS, else 0).
    opaque: usize,
}

impl<'a> Segment<'a> {
    /// Splits one segment (without terminator) using `delims`.
    pub fn parse(raw: &'a [u8], delims: Delimiters) -> Segment<'a> {
        let sep = delims.field;
        let id = raw.get(..3).unwrap_or(raw);
        if is_header_id(id) && raw.get(3) == Some(&sep) {
            let mut fields = Vec::with_capacity(16);
            fields.push(id);
            fields.push(raw.get(3..4).unwrap_or_default());
            fields.extend(raw.get(4..).unwrap_or_default().split(move |&b| b == sep));
            Segment {
                raw,
                delims,
                fields,
                opaque: 2,
            }
        } else {
            Segment {
                raw,
                delims,
                fields: raw.split(move |&b| b == sep).collect(),
                opaque: 0,
            }
        }
    }

    /// The whole segment, without terminator.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The segment id bytes, e.g. `b"PID"` (as received; may be anything
    /// for malformed input).
    pub fn id(&self) -> &'a [u8] {
        self.fields.first().copied().unwrap_or_default()
    }

    /// The segment id as text, if it is valid UTF-8.
    pub fn id_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.id()).ok()
    }

    /// True if the id is `id`.
    pub fn is(&self, id: &str) -> bool {
        self.id() == id.as_bytes()
    }

    /// The delimiters used to split this segment.
    pub fn delimiters(&self) -> &Delimiters {
        &self.delims
    }

    /// Field `n` (1-based, HL7 numbering); `None` if the segment has fewer
    /// fields or `n == 0`.
    pub fn field(&self, n: usize) -> Option<Field<'a>> {
        if n == 0 {
            return None;
        }
        let raw = self.fields.get(n)?;
        Some(Field(Part {
            raw,
            delims: self.delims,
            opaque: n <= self.opaque,
        }))
    }

    /// Number of the last field present (0 for a bare segment id).
    pub fn field_count(&self) -> usize {
        self.fields.len().saturating_sub(1)
    }

    /// All fields, starting with field 1.
    pub fn fields(&self) -> impl Iterator<Item = Field<'a>> + '_ {
        (1..=self.field_count()).filter_map(|n| self.field(n))
    }

    /// Which field (HL7 numbering) holds byte offset `offset` of `raw()`.
    pub(crate) fn field_at_offset(&self, offset: usize) -> usize {
        let before = self.raw.get(..offset).unwrap_or(self.raw);
        let seps = before.iter().filter(|&&b| b == self.delims.field).count();
        if self.opaque > 0 && offset >= 3 {
            // MSH|: the first separator is MSH-1 itself, then shifted by one.
            if offset == 3 {
                1
            } else {
                seps.saturating_add(1)
            }
        } else {
            seps
        }
    }
}

/// A raw piece of a message plus what is needed to navigate and decode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part<'a> {
    raw: &'a [u8],
    delims: Delimiters,
    opaque: bool,
}

impl<'a> Part<'a> {
    fn split(self, sep: u8) -> impl Iterator<Item = Part<'a>> {
        let opaque = self.opaque;
        let delims = self.delims;
        let raw = self.raw;
        let pieces: Box<dyn Iterator<Item = &'a [u8]>> = if raw.is_empty() {
            Box::new(std::iter::empty())
        } else if opaque {
            Box::new(std::iter::once(raw))
        } else {
            Box::new(raw.split(move |&b| b == sep))
        };
        pieces.map(move |raw| Part {
            raw,
            delims,
            opaque,
        })
    }

    fn nth(self, sep: u8, n: usize) -> Option<Part<'a>> {
        let idx = n.checked_sub(1)?;
        self.split(sep).nth(idx)
    }

    fn decoded(self) -> Cow<'a, [u8]> {
        if self.opaque {
            Cow::Borrowed(self.raw)
        } else {
            escape::decode(self.raw, &self.delims)
        }
    }
}

macro_rules! value_methods {
    ($t:ident) => {
        impl<'a> $t<'a> {
            /// The raw bytes, still escaped.
            pub fn raw(&self) -> &'a [u8] {
                self.0.raw
            }

            /// True if there are no bytes at all.
            pub fn is_empty(&self) -> bool {
                self.0.raw.is_empty()
            }

            /// True for the HL7 explicit null `""` ("delete this value").
            pub fn is_null(&self) -> bool {
                self.0.raw == b"\"\""
            }

            /// The raw (still escaped) bytes as text, if valid UTF-8.
            pub fn as_str(&self) -> Option<&'a str> {
                std::str::from_utf8(self.0.raw).ok()
            }

            /// The bytes with escape sequences decoded (see [`crate::escape`]).
            /// Decode at the level you read: decoding a whole field turns
            /// `\S\` into a component separator that is then
            /// indistinguishable from a real one.
            pub fn decoded(&self) -> Cow<'a, [u8]> {
                self.0.decoded()
            }

            /// [`Self::decoded`] as text, `None` if not valid UTF-8.
            pub fn decoded_str(&self) -> Option<Cow<'a, str>> {
                match self.0.decoded() {
                    Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
                    Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
                }
            }

            /// [`Self::decoded`] as text, invalid UTF-8 replaced by U+FFFD.
            pub fn decoded_lossy(&self) -> String {
                String::from_utf8_lossy(&self.0.decoded()).into_owned()
            }
        }
    };
}

/// One field of a segment (all its repetitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a>(Part<'a>);
/// One repetition of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repetition<'a>(Part<'a>);
/// One component of a repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component<'a>(Part<'a>);
/// One subcomponent of a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subcomponent<'a>(Part<'a>);

value_methods!(Field);
value_methods!(Repetition);
value_methods!(Component);
value_methods!(Subcomponent);

impl<'a> Field<'a> {
    /// The repetitions (none for an empty field).
    pub fn repetitions(&self) -> impl Iterator<Item = Repetition<'a>> + use<'a> {
        self.0.split(self.0.delims.repetition).map(Repetition)
    }

    /// Repetition `n` (1-based).
    pub fn repetition(&self, n: usize) -> Option<Repetition<'a>> {
        self.0.nth(self.0.delims.repetition, n).map(Repetition)
    }

    /// Component `n` of the first repetition.
    pub fn component(&self, n: usize) -> Option<Component<'a>> {
        self.repetition(1)?.component(n)
    }
}

impl<'a> Repetition<'a> {
    /// The components (none for an empty repetition).
    pub fn components(&self) -> impl Iterator<Item = Component<'a>> + use<'a> {
        self.0.split(self.0.delims.component).map(Component)
    }

    /// Component `n` (1-based).
    pub fn component(&self, n: usize) -> Option<Component<'a>> {
        self.0.nth(self.0.delims.component, n).map(Component)
    }
}

impl<'a> Component<'a> {
    /// The subcomponents (none for an empty component).
    pub fn subcomponents(&self) -> impl Iterator<Item = Subcomponent<'a>> + use<'a> {
        self.0.split(self.0.delims.subcomponent).map(Subcomponent)
    }

    /// Subcomponent `n` (1-based).
    pub fn subcomponent(&self, n: usize) -> Option<Subcomponent<'a>> {
        self.0.nth(self.0.delims.subcomponent, n).map(Subcomponent)
    }
}

/// A parsed HL7 v2 message, borrowing the input bytes.
///
/// [`Message::parse`] only checks the structure needed to read the message
/// (an MSH segment first, with valid delimiters); it accepts anything else
/// so that even a message that will be rejected can be inspected and
/// answered. Call [`Message::validate`] (or use [`Message::parse_strict`])
/// for the receiver-side checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    raw: &'a [u8],
    delims: Delimiters,
    msh: Segment<'a>,
    body: Vec<Segment<'a>>,
}

impl<'a> Message<'a> {
    /// Parses a message.
    ///
    /// Errors: [`ParseError::Empty`], [`ParseError::MissingMsh`],
    /// [`ParseError::TruncatedMsh`] (input ends inside MSH-1/MSH-2),
    /// [`ParseError::InvalidFieldSeparator`],
    /// [`ParseError::InvalidEncodingCharacters`].
    pub fn parse(input: &'a [u8]) -> Result<Message<'a>, ParseError> {
        let mut lines = segment_lines(input);
        let Some((first, _)) = lines.next() else {
            return Err(ParseError::Empty);
        };
        let first_raw = input.get(first).unwrap_or_default();
        if !first_raw.starts_with(b"MSH") {
            return Err(ParseError::MissingMsh);
        }
        let delims = Delimiters::from_header_segment(first_raw)?;
        let msh = Segment::parse(first_raw, delims);
        let body = lines
            .map(|(content, _)| Segment::parse(input.get(content).unwrap_or_default(), delims))
            .collect();
        Ok(Message {
            raw: input,
            delims,
            msh,
            body,
        })
    }

    /// [`Message::parse`] followed by [`Message::validate`].
    pub fn parse_strict(input: &'a [u8]) -> Result<Message<'a>, ParseError> {
        let message = Message::parse(input)?;
        message.validate()?;
        Ok(message)
    }

    /// The bytes the message was parsed from.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The message's delimiters (from MSH-1 and MSH-2).
    pub fn delimiters(&self) -> &Delimiters {
        &self.delims
    }

    /// The MSH segment.
    pub fn msh(&self) -> &Segment<'a> {
        &self.msh
    }

    /// All segments in order, MSH first.
    pub fn segments(&self) -> impl Iterator<Item = &Segment<'a>> + '_ {
        std::iter::once(&self.msh).chain(self.body.iter())
    }

    /// Number of segments, MSH included.
    pub fn segment_count(&self) -> usize {
        self.body.len().saturating_add(1)
    }

    /// The first segment with id `id`.
    pub fn segment(&self, id: &str) -> Option<&Segment<'a>> {
        self.segments().find(|s| s.is(id))
    }

    /// All segments with id `id`, in order.
    pub fn segments_by_id<'s>(&'s self, id: &'s str) -> impl Iterator<Item = &'s Segment<'a>> + 's {
        self.segments().filter(move |s| s.is(id))
    }

    /// Field `n` of the first segment with id `id`.
    pub fn field(&self, id: &str, n: usize) -> Option<Field<'a>> {
        self.segment(id)?.field(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<&[u8]> {
        segment_lines(input).map(|(r, _)| &input[r]).collect()
    }

    #[test]
    fn splits_all_terminators() {
        let expected: Vec<&[u8]> = vec![b"A", b"B", b"C", b"D"];
        assert_eq!(lines(b"A\rB\rC\rD\r"), expected);
        assert_eq!(lines(b"A\nB\nC\nD"), expected);
        assert_eq!(lines(b"A\r\nB\r\nC\r\nD\r\n"), expected);
        assert_eq!(lines(b"\r\nA\r\r\nB\n\nC\rD"), expected);
        assert!(lines(b"").is_empty());
        assert!(lines(b"\r\n\n\r").is_empty());
    }

    #[test]
    fn full_range_includes_terminator() {
        let input = b"A\r\nBB\n";
        let v: Vec<_> = segment_lines(input).collect();
        assert_eq!(v, vec![(0..1, 0..3), (3..5, 3..6)]);
    }

    #[test]
    fn msh_field_numbering() {
        let m = Message::parse(b"MSH|^~\\&|APP|FAC\rPID|1||X").unwrap();
        let msh = m.msh();
        assert_eq!(msh.field(1).unwrap().raw(), b"|");
        assert_eq!(msh.field(2).unwrap().raw(), b"^~\\&");
        assert_eq!(msh.field(3).unwrap().raw(), b"APP");
        assert_eq!(msh.field(4).unwrap().raw(), b"FAC");
        assert_eq!(msh.field_count(), 4);
        assert!(msh.field(5).is_none());
        assert!(msh.field(0).is_none());
        // MSH-2 is not split or decoded.
        let enc = msh.field(2).unwrap();
        assert_eq!(enc.component(1).unwrap().raw(), b"^~\\&");
        assert_eq!(enc.decoded().as_ref(), b"^~\\&");
        let pid = m.segment("PID").unwrap();
        assert_eq!(pid.field(1).unwrap().raw(), b"1");
        assert_eq!(pid.field(3).unwrap().raw(), b"X");
        assert_eq!(pid.field_count(), 3);
    }

    #[test]
    fn navigation() {
        let m = Message::parse(b"MSH|^~\\&\rZZZ|a^b&c&d^e~f||\"\"").unwrap();
        let z = m.segment("ZZZ").unwrap();
        let f = z.field(1).unwrap();
        assert_eq!(f.repetitions().count(), 2);
        assert_eq!(f.repetition(2).unwrap().raw(), b"f");
        let c2 = f.component(2).unwrap();
        assert_eq!(c2.raw(), b"b&c&d");
        assert_eq!(c2.subcomponent(3).unwrap().raw(), b"d");
        assert!(c2.subcomponent(4).is_none());
        assert!(c2.subcomponent(0).is_none());
        assert_eq!(f.component(3).unwrap().raw(), b"e");
        assert!(f.component(4).is_none());
        let empty = z.field(2).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.repetitions().count(), 0);
        assert!(empty.component(1).is_none());
        assert!(z.field(3).unwrap().is_null());
    }

    #[test]
    fn field_at_offset_counts_msh_shift() {
        let s = Segment::parse(b"MSH|^~\\&|A|B", Delimiters::DEFAULT);
        assert_eq!(s.field_at_offset(3), 1);
        assert_eq!(s.field_at_offset(4), 2);
        assert_eq!(s.field_at_offset(9), 3);
        assert_eq!(s.field_at_offset(11), 4);
        let p = Segment::parse(b"PID|1|X", Delimiters::DEFAULT);
        assert_eq!(p.field_at_offset(1), 0);
        assert_eq!(p.field_at_offset(4), 1);
        assert_eq!(p.field_at_offset(6), 2);
    }
}
