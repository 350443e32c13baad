//! Receiver-side validation ([`Message::validate`]).
//!
//! Checks, in this order (the first failure is returned):
//!
//! 1. no NUL byte anywhere ([`ParseError::NulByte`]) — judgement call: HL7
//!    text never contains NUL, NULs usually mean a framing/transport bug,
//!    and many downstream systems (C strings, databases) truncate at NUL,
//!    so a message with NULs is rejected rather than stored;
//! 2. every segment id is `[A-Z][A-Z0-9]{2}` ([`ParseError::InvalidSegmentId`]);
//! 3. MSH reaches at least MSH-12 ([`ParseError::TruncatedMsh`]);
//! 4. MSH-9.1 message type, MSH-10 control id, MSH-11 processing id and
//!    MSH-12 version are not empty ([`ParseError::MissingRequiredField`]);
//! 5. no second MSH and no batch envelope segment (FHS, BHS, BTS, FTS)
//!    inside the message ([`ParseError::UnexpectedSegment`]);
//! 6. if MSH-18 declares UTF-8, every segment is valid UTF-8
//!    ([`ParseError::InvalidUtf8`]) — judgement call: the message
//!    contradicts its own declaration, so any text taken from it would be
//!    a guess; it is rejected instead of being silently re-encoded. Without
//!    a UTF-8 declaration bytes are not checked (HL7's default is ASCII,
//!    but senders commonly send undeclared Latin-1; carebus stores bytes
//!    exactly as received).
//!
//! [`Message::parse`] itself accepts NULs and invalid UTF-8 so the bytes
//! can still be inspected (and answered with an ACK).

use std::collections::HashMap;

use crate::error::{Location, ParseError};
use crate::message::{Message, Segment};

/// True for a well-formed segment id.
pub(crate) fn is_valid_segment_id(id: &[u8]) -> bool {
    matches!(id, [a, b, c] if a.is_ascii_uppercase()
        && (b.is_ascii_uppercase() || b.is_ascii_digit())
        && (c.is_ascii_uppercase() || c.is_ascii_digit()))
}

/// Gives each segment its [`Location`]: id and occurrence number, or an
/// empty id and the position in the message for unreadable ids.
struct Locator<'m> {
    seen: HashMap<&'m [u8], usize>,
    position: usize,
}

impl<'m> Locator<'m> {
    fn new() -> Self {
        Locator {
            seen: HashMap::new(),
            position: 0,
        }
    }

    fn next(&mut self, segment: &Segment<'m>) -> Location {
        self.position = self.position.saturating_add(1);
        let id = segment.id();
        if is_valid_segment_id(id) {
            let n = self.seen.entry(id).or_insert(0);
            *n = n.saturating_add(1);
            Location::segment(std::str::from_utf8(id).unwrap_or_default(), *n)
        } else {
            Location::segment("", self.position)
        }
    }
}

impl Message<'_> {
    /// Strict receiver-side validation; see the [module docs](crate::validate)
    /// for the checks and the two judgement calls (NUL bytes and invalid
    /// UTF-8 are rejected).
    pub fn validate(&self) -> Result<(), ParseError> {
        // 1. NUL bytes.
        let mut locator = Locator::new();
        for segment in self.segments() {
            let location = locator.next(segment);
            if let Some(offset) = segment.raw().iter().position(|&b| b == 0) {
                return Err(ParseError::NulByte {
                    location: Location {
                        field: Some(segment.field_at_offset(offset)),
                        ..location
                    },
                });
            }
        }
        // 2. Segment ids.
        for (position, segment) in self.segments().enumerate() {
            if !is_valid_segment_id(segment.id()) {
                return Err(ParseError::InvalidSegmentId {
                    location: Location::segment("", position.saturating_add(1)),
                });
            }
        }
        // 3. + 4. MSH required fields.
        let msh = self.msh();
        if msh.field_count() < 12 {
            return Err(ParseError::TruncatedMsh {
                fields: msh.field_count(),
            });
        }
        if self.message_type().is_none() {
            return Err(missing(9));
        }
        for n in [10, 11, 12] {
            if msh.field(n).is_none_or(|f| f.is_empty()) {
                return Err(missing(n));
            }
        }
        // 5. Misplaced header/envelope segments.
        let mut locator = Locator::new();
        for (position, segment) in self.segments().enumerate() {
            let location = locator.next(segment);
            let misplaced = matches!(segment.id(), b"MSH" if position > 0)
                || matches!(segment.id(), b"FHS" | b"BHS" | b"BTS" | b"FTS");
            if misplaced {
                return Err(ParseError::UnexpectedSegment { location });
            }
        }
        // 6. Declared UTF-8.
        if self.declares_utf8() {
            let mut locator = Locator::new();
            for segment in self.segments() {
                let location = locator.next(segment);
                if let Err(e) = std::str::from_utf8(segment.raw()) {
                    return Err(ParseError::InvalidUtf8 {
                        location: Location {
                            field: Some(segment.field_at_offset(e.valid_up_to())),
                            ..location
                        },
                    });
                }
            }
        }
        Ok(())
    }
}

fn missing(field: usize) -> ParseError {
    ParseError::MissingRequiredField {
        location: Location::msh(field),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const OK: &[u8] = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|1\r";

    #[test]
    fn segment_ids() {
        assert!(is_valid_segment_id(b"PID"));
        assert!(is_valid_segment_id(b"ZP1"));
        assert!(!is_valid_segment_id(b"pid"));
        assert!(!is_valid_segment_id(b"1ID"));
        assert!(!is_valid_segment_id(b"PI"));
        assert!(!is_valid_segment_id(b"PIDX"));
    }

    #[test]
    fn valid_minimal() {
        Message::parse_strict(OK).unwrap();
    }

    #[test]
    fn second_msh_is_unexpected() {
        let mut v = OK.to_vec();
        v.extend_from_slice(OK);
        let e = Message::parse_strict(&v).unwrap_err();
        assert_eq!(
            e,
            ParseError::UnexpectedSegment {
                location: Location::segment("MSH", 2)
            }
        );
    }

    #[test]
    fn bad_segment_id_reports_position() {
        let mut v = OK.to_vec();
        v.extend_from_slice(b"pid|x\r");
        assert_eq!(
            Message::parse_strict(&v).unwrap_err(),
            ParseError::InvalidSegmentId {
                location: Location::segment("", 3)
            }
        );
    }

    #[test]
    fn missing_processing_id_and_version() {
        let e = Message::parse_strict(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1||2.5").unwrap_err();
        assert_eq!(e, missing(11));
        let e = Message::parse_strict(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|").unwrap_err();
        assert_eq!(e, missing(12));
        let e = Message::parse_strict(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P").unwrap_err();
        assert_eq!(e, ParseError::TruncatedMsh { fields: 11 });
    }

    #[test]
    fn nul_in_msh_field() {
        let e = Message::parse_strict(b"MSH|^~\\&|A\0|B|C|D|2026||ADT^A01|1|P|2.5").unwrap_err();
        assert_eq!(
            e,
            ParseError::NulByte {
                location: Location::msh(3)
            }
        );
    }

    #[test]
    fn utf8_checked_only_when_declared() {
        let latin1 = b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\rPID|1||\xfc\r";
        Message::parse_strict(latin1).unwrap();
        let declared = b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5||||||UTF-8\rPID|1||\xfc\r";
        assert_eq!(
            Message::parse_strict(declared).unwrap_err(),
            ParseError::InvalidUtf8 {
                location: Location::field("PID", 1, 3)
            }
        );
    }
}
