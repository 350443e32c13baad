//! Delimiters ("encoding characters") of an HL7 v2 message.
//!
//! Every HL7 v2 message declares its own delimiters in the header segment
//! (`MSH`, and likewise `FHS`/`BHS` for batch files): the byte right after
//! the segment id is the field separator (MSH-1) and the following field
//! (MSH-2) holds the component, repetition, escape and subcomponent
//! characters, optionally followed by HL7 2.7's truncation character.

use crate::error::{EncodingProblem, ParseError};

/// The delimiters of one message.
///
/// All delimiters are single ASCII bytes; the content between them may be
/// in any character set, so all parsing is done on bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delimiters {
    /// Field separator (MSH-1), normally `|`.
    pub field: u8,
    /// Component separator, normally `^`.
    pub component: u8,
    /// Repetition separator, normally `~`.
    pub repetition: u8,
    /// Escape character, normally `\`.
    pub escape: u8,
    /// Subcomponent separator, normally `&`.
    pub subcomponent: u8,
    /// HL7 2.7+ truncation character, normally `#`, if MSH-2 declared one.
    pub truncation: Option<u8>,
}

impl Default for Delimiters {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Delimiters {
    /// The recommended delimiters `|^~\&` (no truncation character).
    pub const DEFAULT: Delimiters = Delimiters {
        field: b'|',
        component: b'^',
        repetition: b'~',
        escape: b'\\',
        subcomponent: b'&',
        truncation: None,
    };

    /// The HL7 2.7 recommended delimiters `|^~\&#`.
    pub const DEFAULT_V27: Delimiters = Delimiters {
        truncation: Some(b'#'),
        ..Delimiters::DEFAULT
    };

    /// The encoding characters as written in MSH-2 (4 or 5 bytes).
    pub fn encoding_characters(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5);
        self.write_encoding_characters(&mut out);
        out
    }

    /// Appends the MSH-2 encoding characters to `out`.
    pub fn write_encoding_characters(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ]);
        if let Some(t) = self.truncation {
            out.push(t);
        }
    }

    /// True if `b` is one of the structural delimiters or the escape or
    /// truncation character.
    pub fn is_special(&self, b: u8) -> bool {
        b == self.field
            || b == self.component
            || b == self.repetition
            || b == self.escape
            || b == self.subcomponent
            || Some(b) == self.truncation
    }

    /// Reads the delimiters from the start of a header segment
    /// (`MSH`, `FHS` or `BHS`), e.g. `MSH|^~\&|...`.
    ///
    /// `segment` must start with the three-letter segment id. Rules:
    /// every delimiter must be a printable, non-alphanumeric ASCII byte
    /// (not space), all must be distinct, MSH-2 must hold 4 or 5
    /// characters, and `|` may not be used as anything but the field
    /// separator (a `|` inside MSH-2 means the sender swapped delimiters).
    pub fn from_header_segment(segment: &[u8]) -> Result<Delimiters, ParseError> {
        let Some(&field) = segment.get(3) else {
            return Err(ParseError::TruncatedMsh { fields: 0 });
        };
        if is_terminator(field) {
            return Err(ParseError::TruncatedMsh { fields: 0 });
        }
        if !is_valid_delimiter(field) {
            return Err(ParseError::InvalidFieldSeparator);
        }
        let rest = segment.get(4..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == field || is_terminator(b))
            .unwrap_or(rest.len());
        let ended_by_separator = rest.get(len) == Some(&field);
        let enc = rest.get(..len).unwrap_or_default();
        if enc.len() < 4 {
            return Err(if ended_by_separator {
                ParseError::InvalidEncodingCharacters {
                    problem: EncodingProblem::TooShort,
                }
            } else {
                ParseError::TruncatedMsh { fields: 1 }
            });
        }
        if enc.len() > 5 {
            return Err(ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::TooLong,
            });
        }
        if field != b'|' && enc.contains(&b'|') {
            // `MSH^|~\&^...`: the sender put the field separator somewhere
            // else; the most likely cause is swapped delimiters.
            return Err(ParseError::InvalidFieldSeparator);
        }
        if let Some(_bad) = enc.iter().find(|&&b| !is_valid_delimiter(b)) {
            return Err(ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::InvalidCharacter,
            });
        }
        for (i, b) in enc.iter().enumerate() {
            let later = enc.get(i.saturating_add(1)..).unwrap_or_default();
            if later.contains(b) {
                return Err(ParseError::InvalidEncodingCharacters {
                    problem: EncodingProblem::Duplicate,
                });
            }
        }
        let get = |i: usize| enc.get(i).copied().unwrap_or_default();
        Ok(Delimiters {
            field,
            component: get(0),
            repetition: get(1),
            escape: get(2),
            subcomponent: get(3),
            truncation: enc.get(4).copied(),
        })
    }
}

/// True for CR and LF, the segment terminators accepted by this crate.
pub(crate) fn is_terminator(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// A delimiter must be visible ASCII punctuation.
fn is_valid_delimiter(b: u8) -> bool {
    b.is_ascii_graphic() && !b.is_ascii_alphanumeric()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_default_and_v27() {
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~\\&|A").unwrap(),
            Delimiters::DEFAULT
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~\\&#|A").unwrap(),
            Delimiters::DEFAULT_V27
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~\\&").unwrap(),
            Delimiters::DEFAULT
        );
    }

    #[test]
    fn accepts_nonstandard_but_consistent_delimiters() {
        let d = Delimiters::from_header_segment(b"MSH!@#$%*!X").unwrap();
        assert_eq!(d.field, b'!');
        assert_eq!(d.component, b'@');
        assert_eq!(d.subcomponent, b'%');
        assert_eq!(d.truncation, Some(b'*'));
        assert_eq!(d.encoding_characters(), b"@#$%*".to_vec());
    }

    #[test]
    fn rejects_bad_delimiters() {
        assert_eq!(
            Delimiters::from_header_segment(b"MSHA^~\\&|"),
            Err(ParseError::InvalidFieldSeparator)
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH ^~\\&|"),
            Err(ParseError::InvalidFieldSeparator)
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH^|~\\&^A"),
            Err(ParseError::InvalidFieldSeparator)
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^^\\&|"),
            Err(ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::Duplicate
            })
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~\\A|"),
            Err(ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::InvalidCharacter
            })
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~|"),
            Err(ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::TooShort
            })
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~\\&#*|"),
            Err(ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::TooLong
            })
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH|^~"),
            Err(ParseError::TruncatedMsh { fields: 1 })
        );
        assert_eq!(
            Delimiters::from_header_segment(b"MSH"),
            Err(ParseError::TruncatedMsh { fields: 0 })
        );
    }
}
