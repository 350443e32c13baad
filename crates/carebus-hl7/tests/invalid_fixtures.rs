//! Guards rejection of every fixture in `fixtures/hl7/invalid`: each must
//! be refused by parsing or strict validation with a specific error
//! variant, HL7 error code and location, without panicking, and the error
//! text must not leak message content.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use carebus_hl7::{EncodingProblem, ErrorCode, Location, Message, ParseError};
use common::{fixture, fixture_names};

/// Parse then validate, returning the first error.
fn reject(name: &str) -> ParseError {
    let bytes = fixture(&format!("invalid/{name}"));
    match Message::parse(&bytes) {
        Err(e) => e,
        Ok(m) => m.validate().expect_err(name),
    }
}

/// The expected error for each invalid fixture.
fn expected() -> Vec<(&'static str, ParseError)> {
    vec![
        ("bad_field_separator.hl7", ParseError::InvalidFieldSeparator),
        ("binary_junk.bin", ParseError::MissingMsh),
        ("empty.hl7", ParseError::Empty),
        (
            "empty_control_id.hl7",
            ParseError::MissingRequiredField {
                location: Location::msh(10),
            },
        ),
        (
            "invalid_utf8.hl7",
            ParseError::InvalidUtf8 {
                location: Location::field("PID", 1, 5),
            },
        ),
        (
            "missing_message_type.hl7",
            ParseError::MissingRequiredField {
                location: Location::msh(9),
            },
        ),
        ("no_msh.hl7", ParseError::MissingMsh),
        (
            "nul_bytes.hl7",
            // The NUL bytes precede the id of the second segment, so its id is
            // unreadable: reported by position (2) with the field.
            ParseError::NulByte {
                location: Location::field("", 2, 0),
            },
        ),
        ("truncated_msh.hl7", ParseError::TruncatedMsh { fields: 3 }),
    ]
}

#[test]
fn fixture_list_is_complete() {
    let names: Vec<&str> = expected().iter().map(|(n, _)| *n).collect();
    assert_eq!(fixture_names("invalid"), names);
}

#[test]
fn every_invalid_fixture_gets_its_specific_error() {
    for (name, want) in expected() {
        assert_eq!(reject(name), want, "{name}");
    }
}

#[test]
fn error_codes_per_fixture() {
    let codes: Vec<(&str, u16)> = expected()
        .iter()
        .map(|(n, e)| (*n, e.code().code()))
        .collect();
    assert_eq!(
        codes,
        [
            ("bad_field_separator.hl7", 102),
            ("binary_junk.bin", 100),
            ("empty.hl7", 100),
            ("empty_control_id.hl7", 101),
            ("invalid_utf8.hl7", 102),
            ("missing_message_type.hl7", 101),
            ("no_msh.hl7", 100),
            ("nul_bytes.hl7", 102),
            ("truncated_msh.hl7", 101),
        ]
    );
    assert_eq!(
        ParseError::TruncatedMsh { fields: 3 }.location(),
        Some(Location::msh(9))
    );
}

#[test]
fn judgement_cases_still_parse_leniently() {
    // Plain parsing exposes the bytes; only validation rejects them.
    let nul = fixture("invalid/nul_bytes.hl7");
    let m = Message::parse(&nul).unwrap();
    assert_eq!(m.control_id().unwrap().raw(), b"NUL-1");
    assert_eq!(m.segment_count(), 2);
    assert!(m.segments().nth(1).unwrap().raw().contains(&0));
    assert_eq!(m.raw(), &nul[..]);

    let bad = fixture("invalid/invalid_utf8.hl7");
    let m = Message::parse(&bad).unwrap();
    assert!(m.declares_utf8());
    let family = m.field("PID", 5).unwrap().component(1).unwrap();
    assert_eq!(family.raw(), b"M\xfcller");
    assert!(family.decoded_str().is_none());
    assert_eq!(family.decoded_lossy(), "M\u{fffd}ller");
}

#[test]
fn errors_do_not_leak_content() {
    for (name, _) in expected() {
        let bytes = fixture(&format!("invalid/{name}"));
        let text = reject(name).to_string();
        // No field value of 3+ bytes from the input appears in the message,
        // except segment ids.
        for piece in bytes.split(|b| b"|^~\\&\r\n".contains(b)) {
            if piece.len() >= 4 {
                let piece = String::from_utf8_lossy(piece);
                assert!(
                    !text.contains(piece.as_ref()),
                    "{name}: {text:?} leaks {piece:?}"
                );
            }
        }
        assert!(text.is_ascii(), "{name}: {text:?}");
    }
}

#[test]
fn other_rejections() {
    let cases: Vec<(&[u8], ParseError)> = vec![
        (b"MSH", ParseError::TruncatedMsh { fields: 0 }),
        (b"MSH|^~", ParseError::TruncatedMsh { fields: 1 }),
        (b"MSH|^~\\&", ParseError::TruncatedMsh { fields: 2 }),
        (b"MSH1^~\\&|A", ParseError::InvalidFieldSeparator),
        (b"MSH\x00^~\\&|A", ParseError::InvalidFieldSeparator),
        (
            b"MSH|^^\\&|A",
            ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::Duplicate,
            },
        ),
        (
            b"MSH|^~\\a|A",
            ParseError::InvalidEncodingCharacters {
                problem: EncodingProblem::InvalidCharacter,
            },
        ),
        (b"\r\n\r\n", ParseError::Empty),
        (b"FHS|^~\\&\rMSH|^~\\&", ParseError::MissingMsh),
        (b" MSH|^~\\&|A", ParseError::MissingMsh),
    ];
    for (input, want) in cases {
        let got = match Message::parse(input) {
            Err(e) => e,
            Ok(m) => m.validate().unwrap_err(),
        };
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
    }
    assert_eq!(ParseError::Empty.code(), ErrorCode::SegmentSequenceError);
}
