//! Errors, HL7 error codes (table 0357) and error locations.
//!
//! Error messages never contain field contents: only segment ids (which
//! are checked to be plain `[A-Z0-9]{3}` before they are reported), segment
//! occurrence numbers and field positions. They are safe to log and to send
//! back to a sender in an ERR segment.

use std::fmt;

/// HL7 table 0357 "Message error condition codes".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0: Message accepted.
    MessageAccepted,
    /// 100: Segment sequence error (segments out of order, missing, unknown).
    SegmentSequenceError,
    /// 101: Required field missing.
    RequiredFieldMissing,
    /// 102: Data type error (field content does not match its type).
    DataTypeError,
    /// 103: Table value not found.
    TableValueNotFound,
    /// 104: Value too long (HL7 2.7+).
    ValueTooLong,
    /// 200: Unsupported message type.
    UnsupportedMessageType,
    /// 201: Unsupported event code.
    UnsupportedEventCode,
    /// 202: Unsupported processing id.
    UnsupportedProcessingId,
    /// 203: Unsupported version id.
    UnsupportedVersionId,
    /// 204: Unknown key identifier.
    UnknownKeyIdentifier,
    /// 205: Duplicate key identifier.
    DuplicateKeyIdentifier,
    /// 206: Application record locked.
    ApplicationRecordLocked,
    /// 207: Application internal error.
    ApplicationInternalError,
}

impl ErrorCode {
    /// All codes, in numeric order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::MessageAccepted,
        ErrorCode::SegmentSequenceError,
        ErrorCode::RequiredFieldMissing,
        ErrorCode::DataTypeError,
        ErrorCode::TableValueNotFound,
        ErrorCode::ValueTooLong,
        ErrorCode::UnsupportedMessageType,
        ErrorCode::UnsupportedEventCode,
        ErrorCode::UnsupportedProcessingId,
        ErrorCode::UnsupportedVersionId,
        ErrorCode::UnknownKeyIdentifier,
        ErrorCode::DuplicateKeyIdentifier,
        ErrorCode::ApplicationRecordLocked,
        ErrorCode::ApplicationInternalError,
    ];

    /// The numeric table 0357 code, e.g. `101`.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::MessageAccepted => 0,
            ErrorCode::SegmentSequenceError => 100,
            ErrorCode::RequiredFieldMissing => 101,
            ErrorCode::DataTypeError => 102,
            ErrorCode::TableValueNotFound => 103,
            ErrorCode::ValueTooLong => 104,
            ErrorCode::UnsupportedMessageType => 200,
            ErrorCode::UnsupportedEventCode => 201,
            ErrorCode::UnsupportedProcessingId => 202,
            ErrorCode::UnsupportedVersionId => 203,
            ErrorCode::UnknownKeyIdentifier => 204,
            ErrorCode::DuplicateKeyIdentifier => 205,
            ErrorCode::ApplicationRecordLocked => 206,
            ErrorCode::ApplicationInternalError => 207,
        }
    }

    /// The table 0357 description, e.g. `Required field missing`.
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::MessageAccepted => "Message accepted",
            ErrorCode::SegmentSequenceError => "Segment sequence error",
            ErrorCode::RequiredFieldMissing => "Required field missing",
            ErrorCode::DataTypeError => "Data type error",
            ErrorCode::TableValueNotFound => "Table value not found",
            ErrorCode::ValueTooLong => "Value too long",
            ErrorCode::UnsupportedMessageType => "Unsupported message type",
            ErrorCode::UnsupportedEventCode => "Unsupported event code",
            ErrorCode::UnsupportedProcessingId => "Unsupported processing id",
            ErrorCode::UnsupportedVersionId => "Unsupported version id",
            ErrorCode::UnknownKeyIdentifier => "Unknown key identifier",
            ErrorCode::DuplicateKeyIdentifier => "Duplicate key identifier",
            ErrorCode::ApplicationRecordLocked => "Application record locked",
            ErrorCode::ApplicationInternalError => "Application internal error",
        }
    }

    /// Looks a numeric code up.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.description())
    }
}

/// Where in a message an error is, as reported in ERR-2 (`SEG^seq^field`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// Segment id, e.g. `PID`. Empty when the segment's id itself is
    /// unreadable (not `[A-Z][A-Z0-9]{2}`); then `sequence` is the
    /// segment's position in the message instead of its occurrence number.
    pub segment: String,
    /// 1-based occurrence of this segment id in the message (the second
    /// OBX has sequence 2).
    pub sequence: usize,
    /// 1-based field position (HL7 numbering, MSH-1 is the field separator),
    /// if the error concerns a field.
    pub field: Option<usize>,
}

impl Location {
    /// Location of a whole segment.
    pub fn segment(segment: &str, sequence: usize) -> Location {
        Location {
            segment: segment.to_owned(),
            sequence,
            field: None,
        }
    }

    /// Location of a field.
    pub fn field(segment: &str, sequence: usize, field: usize) -> Location {
        Location {
            segment: segment.to_owned(),
            sequence,
            field: Some(field),
        }
    }

    /// Location of an MSH field.
    pub fn msh(field: usize) -> Location {
        Location::field("MSH", 1, field)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segment.is_empty() {
            write!(f, "segment #{}", self.sequence)?;
        } else if self.sequence == 1 {
            write!(f, "{}", self.segment)?;
        } else {
            write!(f, "{}[{}]", self.segment, self.sequence)?;
        }
        if let Some(field) = self.field {
            if self.segment.is_empty() {
                write!(f, " field {field}")?;
            } else {
                write!(f, "-{field}")?;
            }
        }
        Ok(())
    }
}

/// What is wrong with the encoding characters in MSH-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncodingProblem {
    /// Fewer than 4 encoding characters.
    TooShort,
    /// More than 5 encoding characters.
    TooLong,
    /// A character that is not printable, non-alphanumeric ASCII.
    InvalidCharacter,
    /// The same character used for two delimiters.
    Duplicate,
}

impl fmt::Display for EncodingProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodingProblem::TooShort => "fewer than 4 characters",
            EncodingProblem::TooLong => "more than 5 characters",
            EncodingProblem::InvalidCharacter => "a character that is not ASCII punctuation",
            EncodingProblem::Duplicate => "the same character used twice",
        })
    }
}

/// Why a message could not be parsed, validated, or read as an ACK.
///
/// Use [`ParseError::code`] and [`ParseError::location`] to fill an ERR
/// segment (see [`crate::AckError::from`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The input is empty (or holds only line breaks).
    #[error("empty message")]
    Empty,
    /// The first segment is not MSH (includes random binary data).
    #[error("message does not start with an MSH segment")]
    MissingMsh,
    /// The MSH segment ends before its required fields: either before the
    /// encoding characters are complete, or before MSH-12. `fields` is the
    /// number of the last MSH field present.
    #[error("MSH segment is truncated after field {fields}")]
    TruncatedMsh {
        /// HL7 number of the last MSH field present (0: not even MSH-1).
        fields: usize,
    },
    /// MSH-1 is not a valid field separator (alphanumeric, space, control
    /// character, non-ASCII) or the delimiters look swapped (`|` used in
    /// MSH-2 while another byte is the field separator).
    #[error("invalid field separator in MSH-1")]
    InvalidFieldSeparator,
    /// MSH-2 does not hold valid encoding characters.
    #[error("invalid encoding characters in MSH-2: {problem}")]
    InvalidEncodingCharacters {
        /// What is wrong.
        problem: EncodingProblem,
    },
    /// A required field is empty or absent.
    #[error("required field {location} is missing")]
    MissingRequiredField {
        /// The field.
        location: Location,
    },
    /// A segment id is not three upper-case letters or digits.
    #[error("invalid segment id at {location}")]
    InvalidSegmentId {
        /// The segment (its id is reported empty, `sequence` is its position).
        location: Location,
    },
    /// A segment that may not appear here (a second MSH, or batch
    /// envelope segments inside a message).
    #[error("unexpected segment {location}")]
    UnexpectedSegment {
        /// The segment.
        location: Location,
    },
    /// A NUL byte (0x00) inside a segment.
    #[error("NUL byte in {location}")]
    NulByte {
        /// The field holding the NUL byte.
        location: Location,
    },
    /// MSH-18 declares UTF-8 but the bytes are not valid UTF-8.
    #[error("invalid UTF-8 in {location} although the message declares UTF-8 (MSH-18)")]
    InvalidUtf8 {
        /// The field holding the invalid bytes.
        location: Location,
    },
    /// A required segment (e.g. MSA in an ACK) is absent.
    #[error("required segment {segment} is missing")]
    MissingSegment {
        /// Segment id.
        segment: &'static str,
    },
    /// MSA-1 is not one of AA, AE, AR, CA, CE, CR.
    #[error("invalid acknowledgment code in MSA-1")]
    InvalidAckCode,
}

impl ParseError {
    /// The HL7 table 0357 code to report for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::Empty
            | ParseError::MissingMsh
            | ParseError::InvalidSegmentId { .. }
            | ParseError::UnexpectedSegment { .. }
            | ParseError::MissingSegment { .. } => ErrorCode::SegmentSequenceError,
            ParseError::TruncatedMsh { .. } | ParseError::MissingRequiredField { .. } => {
                ErrorCode::RequiredFieldMissing
            }
            ParseError::InvalidFieldSeparator
            | ParseError::InvalidEncodingCharacters { .. }
            | ParseError::NulByte { .. }
            | ParseError::InvalidUtf8 { .. } => ErrorCode::DataTypeError,
            ParseError::InvalidAckCode => ErrorCode::TableValueNotFound,
        }
    }

    /// Where the error is, for ERR-2.
    pub fn location(&self) -> Option<Location> {
        match self {
            ParseError::Empty | ParseError::MissingMsh => Some(Location::segment("MSH", 1)),
            ParseError::TruncatedMsh { fields } => {
                // First required field not present: MSH-1, MSH-2, else MSH-9..12.
                let missing = match fields {
                    0 => 1,
                    1 => 2,
                    n if *n < 9 => 9,
                    n => n.saturating_add(1),
                };
                Some(Location::msh(missing))
            }
            ParseError::InvalidFieldSeparator => Some(Location::msh(1)),
            ParseError::InvalidEncodingCharacters { .. } => Some(Location::msh(2)),
            ParseError::MissingRequiredField { location }
            | ParseError::InvalidSegmentId { location }
            | ParseError::UnexpectedSegment { location }
            | ParseError::NulByte { location }
            | ParseError::InvalidUtf8 { location } => Some(location.clone()),
            ParseError::MissingSegment { segment } => Some(Location::segment(segment, 1)),
            ParseError::InvalidAckCode => Some(Location::field("MSA", 1, 1)),
        }
    }
}

/// Errors from [`crate::parse_batch`] and [`crate::Batch::verify_counts`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The input is empty.
    #[error("empty batch")]
    Empty,
    /// A segment that does not belong where it is (e.g. a PID before any
    /// MSH, a second FHS, anything after FTS). `index` is the 1-based
    /// position of the segment in the file.
    #[error("unexpected segment {segment} at position {index} of the batch")]
    UnexpectedSegment {
        /// Segment id (empty if unreadable).
        segment: String,
        /// 1-based position among the file's segments.
        index: usize,
    },
    /// A BHS opened while the previous batch had no BTS, or FTS with an
    /// open batch. `index` is the 1-based position of the segment.
    #[error("batch header/trailer mismatch at position {index} of the batch")]
    UnbalancedEnvelope {
        /// 1-based position among the file's segments.
        index: usize,
    },
    /// FHS or BHS has invalid delimiters.
    #[error("invalid {segment} header: {source}")]
    InvalidHeader {
        /// `FHS` or `BHS`.
        segment: &'static str,
        /// What is wrong.
        source: ParseError,
    },
    /// BTS-1 / FTS-1 is not a number.
    #[error("{segment}-1 count is not a number (batch {batch})")]
    InvalidCount {
        /// `BTS` or `FTS`.
        segment: &'static str,
        /// 1-based batch number (for FTS: 0).
        batch: usize,
    },
    /// BTS-1 (message count) or FTS-1 (batch count) differs from what
    /// the file holds.
    #[error("{segment}-1 declares {declared} but the {} holds {actual}", if *segment == "FTS" { "file" } else { "batch" })]
    CountMismatch {
        /// `BTS` or `FTS`.
        segment: &'static str,
        /// 1-based batch number (for FTS: 0).
        batch: usize,
        /// Count in the trailer.
        declared: u64,
        /// Count found.
        actual: u64,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(999), None);
        assert_eq!(ErrorCode::RequiredFieldMissing.code(), 101);
        assert_eq!(ErrorCode::ApplicationInternalError.code(), 207);
    }

    #[test]
    fn location_display() {
        assert_eq!(Location::msh(10).to_string(), "MSH-10");
        assert_eq!(Location::field("OBX", 2, 5).to_string(), "OBX[2]-5");
        assert_eq!(Location::segment("", 3).to_string(), "segment #3");
        assert_eq!(Location::field("", 3, 2).to_string(), "segment #3 field 2");
    }

    #[test]
    fn error_codes_and_locations() {
        let e = ParseError::TruncatedMsh { fields: 3 };
        assert_eq!(e.code(), ErrorCode::RequiredFieldMissing);
        assert_eq!(e.location(), Some(Location::msh(9)));
        let e = ParseError::TruncatedMsh { fields: 10 };
        assert_eq!(e.location(), Some(Location::msh(11)));
        assert_eq!(ParseError::MissingMsh.code().code(), 100);
        assert_eq!(ParseError::InvalidFieldSeparator.code().code(), 102);
    }
}
