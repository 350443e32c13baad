//! Building acknowledgments (receiver side) and reading them (sender side).
//!
//! An ACK built by [`build_ack`] uses the original message's delimiters,
//! swaps sender and receiver (MSH-3/4 ⇄ MSH-5/6), sets MSH-9 to
//! `ACK^<original trigger>^ACK`, mirrors MSH-11 and MSH-12, and answers
//! MSA-2 with the original MSH-10. Every segment ends with CR (the HL7
//! segment terminator), the last one included. All caller-supplied text
//! (control id, timestamp, error text) is escaped.
//!
//! A receiver answers every input, even one without a readable MSH:
//!
//! ```
//! use carebus_hl7::{AckCode, AckError, AckOptions, Message, build_ack, build_ack_without_header, parse_ack};
//!
//! fn answer(bytes: &[u8]) -> Vec<u8> {
//!     let opts = |code, error| AckOptions { code, control_id: "ACK-1", timestamp: "20260101120000", error };
//!     match Message::parse(bytes) {
//!         Err(e) => build_ack_without_header(&opts(AckCode::AR, Some(&AckError::from(&e)))),
//!         Ok(msg) => match msg.validate() {
//!             Ok(()) => build_ack(&msg, &opts(AckCode::AA, None)),
//!             Err(e) => build_ack(&msg, &opts(AckCode::AR, Some(&AckError::from(&e)))),
//!         },
//!     }
//! }
//!
//! let ack = answer(b"PID|1\r");
//! assert_eq!(parse_ack(&ack)?.code, AckCode::AR);
//! let ack = answer(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|X1|P|2.5\r");
//! assert_eq!(parse_ack(&ack)?.code, AckCode::AA);
//! assert_eq!(parse_ack(&ack)?.acknowledged_control_id, b"X1");
//! # Ok::<(), carebus_hl7::ParseError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::encoding::Delimiters;
use crate::error::{ErrorCode, Location, ParseError};
use crate::escape::encode_into;
use crate::message::{Field, Message};

/// MSA-1 acknowledgment code (HL7 table 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error.
    AE,
    /// Original mode: application reject.
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    /// The two-letter code.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    /// Parses a code from bytes (exact, upper case, surrounding spaces ignored).
    pub fn from_bytes(raw: &[u8]) -> Option<AckCode> {
        match raw.trim_ascii() {
            b"AA" => Some(AckCode::AA),
            b"AE" => Some(AckCode::AE),
            b"AR" => Some(AckCode::AR),
            b"CA" => Some(AckCode::CA),
            b"CE" => Some(AckCode::CE),
            b"CR" => Some(AckCode::CR),
            _ => None,
        }
    }

    /// True for AA and CA.
    pub fn is_accept(self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }

    /// True for AE and CE (the sender may retry after correcting).
    pub fn is_error(self) -> bool {
        matches!(self, AckCode::AE | AckCode::CE)
    }

    /// True for AR and CR (the sender should not resend as is).
    pub fn is_reject(self) -> bool {
        matches!(self, AckCode::AR | AckCode::CR)
    }

    /// True for the enhanced-mode (commit) codes CA, CE, CR.
    pub fn is_enhanced(self) -> bool {
        matches!(self, AckCode::CA | AckCode::CE | AckCode::CR)
    }
}

impl fmt::Display for AckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AckCode {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AckCode::from_bytes(s.as_bytes()).ok_or(ParseError::InvalidAckCode)
    }
}

/// ERR-4 severity (HL7 table 0516).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Severity {
    /// `E`: error.
    #[default]
    Error,
    /// `W`: warning.
    Warning,
    /// `I`: information.
    Information,
    /// `F`: fatal error.
    Fatal,
}

impl Severity {
    /// The one-letter code.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "E",
            Severity::Warning => "W",
            Severity::Information => "I",
            Severity::Fatal => "F",
        }
    }
}

/// The error reported in an ACK's ERR segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// HL7 table 0357 code (ERR-3, or ERR-1.4 before 2.5).
    pub code: ErrorCode,
    /// Where the error is (ERR-2, or ERR-1.1–3 before 2.5).
    pub location: Option<Location>,
    /// ERR-4 severity.
    pub severity: Severity,
    /// ERR-8 user message (MSA-3 too before 2.5). Must not contain PHI;
    /// it is escaped when written.
    pub message: Option<String>,
}

impl AckError {
    /// An error with a code only.
    pub fn new(code: ErrorCode) -> AckError {
        AckError {
            code,
            location: None,
            severity: Severity::Error,
            message: None,
        }
    }
}

impl From<&ParseError> for AckError {
    /// Code, location and the PHI-free error text of a parse/validation error.
    fn from(e: &ParseError) -> AckError {
        AckError {
            code: e.code(),
            location: e.location(),
            severity: Severity::Error,
            message: Some(e.to_string()),
        }
    }
}

/// What to put into an ACK besides what comes from the original message.
#[derive(Debug, Clone, Copy)]
pub struct AckOptions<'x> {
    /// MSA-1.
    pub code: AckCode,
    /// MSH-10 of the ACK itself.
    pub control_id: &'x str,
    /// MSH-7 of the ACK, e.g. `20261102083016+0000`.
    pub timestamp: &'x str,
    /// Optional ERR segment.
    pub error: Option<&'x AckError>,
}

/// Builds the acknowledgment of `original` (see the module docs).
///
/// For HL7 2.5 and later (and when MSH-12 is unreadable) the error goes into
/// ERR-2 (`SEG^seq^field`), ERR-3 (`code^text^HL70357`), ERR-4 (severity)
/// and ERR-8 (message). Before 2.5 it goes into ERR-1
/// (`SEG^seq^field^code&text&HL70357`) and the message into MSA-3.
pub fn build_ack(original: &Message<'_>, options: &AckOptions<'_>) -> Vec<u8> {
    let d = *original.delimiters();
    let raw = |n: usize| {
        original
            .msh()
            .field(n)
            .map(|f: Field<'_>| f.raw())
            .unwrap_or_default()
    };
    let modern = original.version_number().is_none_or(|v| v >= (2, 5));
    let header = Header {
        sending_application: raw(5),
        sending_facility: raw(6),
        receiving_application: raw(3),
        receiving_facility: raw(4),
        trigger: original
            .trigger_event()
            .map(|c| c.raw())
            .unwrap_or_default(),
        processing_id: raw(11),
        version: raw(12),
    };
    write_ack(
        &d,
        &header,
        original.control_id().map(|f| f.raw()).unwrap_or_default(),
        modern,
        options,
    )
}

/// Builds a negative ACK when the input had no readable MSH (so there is
/// nothing to mirror): delimiters `|^~\&`, MSH-11 `P`, MSH-12 `2.5`, MSH-9
/// `ACK^^ACK`, empty MSH-3..6 and an empty MSA-2.
///
/// `options.code` is normally [`AckCode::AR`] (or [`AckCode::CR`]).
pub fn build_ack_without_header(options: &AckOptions<'_>) -> Vec<u8> {
    let header = Header {
        sending_application: b"",
        sending_facility: b"",
        receiving_application: b"",
        receiving_facility: b"",
        trigger: b"",
        processing_id: b"P",
        version: b"2.5",
    };
    write_ack(&Delimiters::DEFAULT, &header, b"", true, options)
}

/// Raw (already escaped) MSH values of the ACK.
struct Header<'h> {
    sending_application: &'h [u8],
    sending_facility: &'h [u8],
    receiving_application: &'h [u8],
    receiving_facility: &'h [u8],
    trigger: &'h [u8],
    processing_id: &'h [u8],
    version: &'h [u8],
}

fn write_ack(
    d: &Delimiters,
    h: &Header<'_>,
    original_control_id: &[u8],
    modern: bool,
    options: &AckOptions<'_>,
) -> Vec<u8> {
    let f = d.field;
    let c = d.component;
    let mut out = Vec::with_capacity(256);
    // MSH
    out.extend_from_slice(b"MSH");
    out.push(f);
    d.write_encoding_characters(&mut out);
    for value in [
        h.sending_application,
        h.sending_facility,
        h.receiving_application,
        h.receiving_facility,
    ] {
        out.push(f);
        out.extend_from_slice(value);
    }
    out.push(f);
    encode_into(options.timestamp.as_bytes(), d, &mut out);
    out.push(f); // MSH-8 security
    out.push(f);
    out.extend_from_slice(b"ACK");
    out.push(c);
    out.extend_from_slice(h.trigger);
    out.push(c);
    out.extend_from_slice(b"ACK");
    out.push(f);
    encode_into(options.control_id.as_bytes(), d, &mut out);
    out.push(f);
    out.extend_from_slice(h.processing_id);
    out.push(f);
    out.extend_from_slice(h.version);
    out.push(b'\r');
    // MSA
    out.extend_from_slice(b"MSA");
    out.push(f);
    out.extend_from_slice(options.code.as_str().as_bytes());
    out.push(f);
    out.extend_from_slice(original_control_id);
    if let Some(text) = options.error.and_then(|e| e.message.as_deref())
        && !modern
    {
        out.push(f);
        encode_into(text.as_bytes(), d, &mut out);
    }
    out.push(b'\r');
    // ERR
    if let Some(err) = options.error {
        if modern {
            write_err_modern(d, err, &mut out);
        } else {
            write_err_legacy(d, err, &mut out);
        }
        out.push(b'\r');
    }
    out
}

/// `SEG^seq^field`; with `always_three`, the field component is written
/// even when empty (ERR-1 needs the code in the fourth component).
fn write_location(d: &Delimiters, location: &Location, always_three: bool, out: &mut Vec<u8>) {
    encode_into(location.segment.as_bytes(), d, out);
    out.push(d.component);
    out.extend_from_slice(location.sequence.to_string().as_bytes());
    if location.field.is_some() || always_three {
        out.push(d.component);
    }
    if let Some(field) = location.field {
        out.extend_from_slice(field.to_string().as_bytes());
    }
}

/// `ERR||SEG^seq^field|code^text^HL70357|E||||message`
fn write_err_modern(d: &Delimiters, err: &AckError, out: &mut Vec<u8>) {
    let f = d.field;
    out.extend_from_slice(b"ERR");
    out.push(f); // ERR-1 (deprecated) empty
    out.push(f);
    if let Some(location) = &err.location {
        write_location(d, location, false, out);
    }
    out.push(f);
    out.extend_from_slice(err.code.code().to_string().as_bytes());
    out.push(d.component);
    encode_into(err.code.description().as_bytes(), d, out);
    out.push(d.component);
    out.extend_from_slice(b"HL70357");
    out.push(f);
    out.extend_from_slice(err.severity.as_str().as_bytes());
    if let Some(message) = &err.message {
        out.extend_from_slice(&[f, f, f, f]); // ERR-5, 6, 7 empty
        encode_into(message.as_bytes(), d, out);
    }
}

/// `ERR|SEG^seq^field^code&text&HL70357`
fn write_err_legacy(d: &Delimiters, err: &AckError, out: &mut Vec<u8>) {
    out.extend_from_slice(b"ERR");
    out.push(d.field);
    match &err.location {
        Some(location) => write_location(d, location, true, out),
        None => out.extend_from_slice(&[d.component, d.component]),
    }
    out.push(d.component);
    out.extend_from_slice(err.code.code().to_string().as_bytes());
    out.push(d.subcomponent);
    encode_into(err.code.description().as_bytes(), d, out);
    out.push(d.subcomponent);
    out.extend_from_slice(b"HL70357");
}

/// One ERR segment of a received ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckErrorInfo {
    /// Numeric error code (ERR-3.1, else ERR-1.4.1), if numeric.
    pub code: Option<u16>,
    /// ERR-4 severity code, if present.
    pub severity: Option<String>,
    /// Raw location (ERR-2, else ERR-1.1–3), e.g. `PID^1^3`.
    pub location: Option<String>,
    /// Best text: ERR-8 user message, else ERR-3.2 / ERR-1.4.2.
    pub text: Option<String>,
}

/// A parsed acknowledgment (sender side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAck<'a> {
    /// The whole ACK message.
    pub message: Message<'a>,
    /// MSA-1.
    pub code: AckCode,
    /// MSA-2: the control id of the message being acknowledged (raw).
    pub acknowledged_control_id: &'a [u8],
    /// MSA-3 text message (decoded), if present.
    pub text: Option<String>,
    /// All ERR segments.
    pub errors: Vec<AckErrorInfo>,
}

impl ParsedAck<'_> {
    /// The most useful human text: MSA-3, else the first ERR text.
    pub fn best_text(&self) -> Option<&str> {
        self.text
            .as_deref()
            .or_else(|| self.errors.iter().find_map(|e| e.text.as_deref()))
    }
}

fn lossy_non_empty(bytes: &[u8]) -> Option<String> {
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// Parses an acknowledgment: any message with an MSA segment (the MSH-9
/// type is not checked, so application-level responses work too).
///
/// Errors: those of [`Message::parse`], [`ParseError::MissingSegment`]
/// without MSA, [`ParseError::InvalidAckCode`] when MSA-1 is not a
/// table 0008 code.
pub fn parse_ack(input: &[u8]) -> Result<ParsedAck<'_>, ParseError> {
    let message = Message::parse(input)?;
    let msa = message
        .segment("MSA")
        .ok_or(ParseError::MissingSegment { segment: "MSA" })?;
    let code = msa
        .field(1)
        .and_then(|f| AckCode::from_bytes(f.raw()))
        .ok_or(ParseError::InvalidAckCode)?;
    let acknowledged_control_id = msa.field(2).map(|f| f.raw()).unwrap_or_default();
    let text = msa.field(3).and_then(|f| lossy_non_empty(&f.decoded()));
    let errors = message
        .segments_by_id("ERR")
        .map(|err| {
            let legacy = err.field(1).and_then(|f| f.repetition(1));
            let legacy_code = legacy.and_then(|r| r.component(4));
            let code3 = err
                .field(3)
                .and_then(|f| f.component(1))
                .map(|c| c.raw())
                .filter(|c| !c.is_empty());
            let code = code3
                .or_else(|| legacy_code.and_then(|c| c.subcomponent(1)).map(|s| s.raw()))
                .and_then(|c| std::str::from_utf8(c).ok()?.trim().parse().ok());
            let location = err
                .field(2)
                .and_then(|f| f.repetition(1))
                .map(|r| r.raw())
                .filter(|r| !r.is_empty())
                .or_else(|| {
                    let raw = legacy?.raw();
                    let c = err.delimiters().component;
                    // First three components of ERR-1.
                    let mut end = raw.len();
                    let mut seen = 0;
                    for (i, &b) in raw.iter().enumerate() {
                        if b == c {
                            seen += 1;
                            if seen == 3 {
                                end = i;
                                break;
                            }
                        }
                    }
                    raw.get(..end)
                        .filter(|r| !r.is_empty() && r.iter().any(|&b| b != c))
                })
                .and_then(lossy_non_empty);
            let text = err
                .field(8)
                .and_then(|f| lossy_non_empty(&f.decoded()))
                .or_else(|| {
                    err.field(3)?
                        .component(2)
                        .and_then(|c| lossy_non_empty(&c.decoded()))
                })
                .or_else(|| {
                    legacy_code?
                        .subcomponent(2)
                        .and_then(|s| lossy_non_empty(&s.decoded()))
                });
            AckErrorInfo {
                code,
                severity: err.field(4).and_then(|f| lossy_non_empty(f.raw())),
                location,
                text,
            }
        })
        .collect();
    Ok(ParsedAck {
        code,
        acknowledged_control_id,
        text,
        errors,
        message,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        for code in [
            AckCode::AA,
            AckCode::AE,
            AckCode::AR,
            AckCode::CA,
            AckCode::CE,
            AckCode::CR,
        ] {
            assert_eq!(code.as_str().parse::<AckCode>().unwrap(), code);
            let kinds = [code.is_accept(), code.is_error(), code.is_reject()];
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{code}");
        }
        assert!(AckCode::CE.is_enhanced());
        assert!(!AckCode::AE.is_enhanced());
        assert_eq!("aa".parse::<AckCode>(), Err(ParseError::InvalidAckCode));
    }

    #[test]
    fn legacy_err_round_trip() {
        let orig = Message::parse(b"MSH|^~\\&|S|SF|R|RF|2026||ORM^O01|C1|P|2.3.1\r").unwrap();
        let err = AckError {
            code: ErrorCode::RequiredFieldMissing,
            location: Some(Location::field("PID", 1, 3)),
            severity: Severity::Error,
            message: Some("PID-3 missing | bad".into()),
        };
        let ack = build_ack(
            &orig,
            &AckOptions {
                code: AckCode::AE,
                control_id: "A1",
                timestamp: "2026",
                error: Some(&err),
            },
        );
        assert_eq!(
            ack,
            b"MSH|^~\\&|R|RF|S|SF|2026||ACK^O01^ACK|A1|P|2.3.1\r\
MSA|AE|C1|PID-3 missing \\F\\ bad\r\
ERR|PID^1^3^101&Required field missing&HL70357\r"
                .to_vec()
        );
        let parsed = parse_ack(&ack).unwrap();
        assert_eq!(parsed.code, AckCode::AE);
        assert_eq!(parsed.text.as_deref(), Some("PID-3 missing | bad"));
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].code, Some(101));
        assert_eq!(parsed.errors[0].location.as_deref(), Some("PID^1^3"));
        assert_eq!(
            parsed.errors[0].text.as_deref(),
            Some("Required field missing")
        );
    }
}
