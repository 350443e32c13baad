//! HL7 v2 parsing for carebus.
//!
//! Zero-copy over the input bytes (HL7 content may be in any character
//! set; only the delimiters are ASCII), never panics on any input.
//!
//! - [`Message::parse`] reads a message (CR, LF or CRLF segment
//!   terminators), [`Message::validate`] applies the strict receiver
//!   checks, whose errors ([`ParseError`]) carry an HL7 table 0357
//!   [`ErrorCode`] and a [`Location`] for an ERR segment.
//! - [`Segment`] → [`Field`] → [`Repetition`] → [`Component`] →
//!   [`Subcomponent`], with HL7 numbering (MSH-1 is the field separator).
//! - [`escape`] decodes and encodes escape sequences.
//! - MSH convenience accessors ([`Message::control_id`], …) and
//!   [`Message::patient_identifier`].
//! - [`build_ack`] / [`build_ack_without_header`] answer a message;
//!   [`parse_ack`] reads an answer.
//! - [`parse_batch`] splits FHS/BHS batch files into messages.
//!
//! ```
//! use carebus_hl7::{AckCode, AckOptions, Message, build_ack, parse_ack};
//!
//! let bytes = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ORU^R01|C42|P|2.5.1\rPID|1||MRN1^^^HOSP\r";
//! let msg = Message::parse_strict(bytes)?;
//! assert_eq!(msg.control_id().map(|f| f.raw()), Some(&b"C42"[..]));
//! assert_eq!(msg.patient_identifier().map(|p| p.id.raw()), Some(&b"MRN1"[..]));
//!
//! let ack = build_ack(&msg, &AckOptions {
//!     code: AckCode::AA,
//!     control_id: "ACK1",
//!     timestamp: "20260101120001",
//!     error: None,
//! });
//! let parsed = parse_ack(&ack)?;
//! assert_eq!(parsed.code, AckCode::AA);
//! assert_eq!(parsed.acknowledged_control_id, b"C42");
//! # Ok::<(), carebus_hl7::ParseError>(())
//! ```

pub mod ack;
pub mod batch;
pub mod encoding;
pub mod error;
pub mod escape;
pub mod header;
pub mod message;
pub mod validate;

pub use ack::{
    AckCode, AckError, AckErrorInfo, AckOptions, ParsedAck, Severity, build_ack,
    build_ack_without_header, parse_ack,
};
pub use batch::{Batch, BatchGroup, BatchMessage, Envelope, parse_batch, parse_batch_strict};
pub use encoding::Delimiters;
pub use error::{BatchError, EncodingProblem, ErrorCode, Location, ParseError};
pub use header::PatientIdentifier;
pub use message::{Component, Field, Message, Repetition, Segment, Subcomponent};
