//! Guards ACK building (receiver side) and ACK parsing (sender side):
//! exact bytes for a known input, swapped sender/receiver, MSA-2 = original
//! MSH-10, ERR segments for AE/AR in the 2.5+ and pre-2.5 forms, escaping of
//! caller text, enhanced-mode codes, original delimiters, the no-MSH
//! negative ACK, and round trips through `parse_ack`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use carebus_hl7::{
    AckCode, AckError, AckOptions, ErrorCode, Location, Message, ParseError, Severity, build_ack,
    build_ack_without_header, parse_ack,
};
use common::fixture;

fn opts<'x>(code: AckCode, error: Option<&'x AckError>) -> AckOptions<'x> {
    AckOptions {
        code,
        control_id: "CB-ACK-1",
        timestamp: "20261102083016",
        error,
    }
}

#[test]
fn exact_aa_for_adt_a01() {
    let bytes = fixture("valid/adt_a01_admit.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    let ack = build_ack(&m, &opts(AckCode::AA, None));
    assert_eq!(
        String::from_utf8(ack).unwrap(),
        "MSH|^~\\&|CAREBUS|REGIONLAB|EPICADT|NORTHGATE^1.2.840.114350.1.13.99^ISO|20261102083016||ACK^A01^ACK|CB-ACK-1|P|2.5.1\r\
         MSA|AA|NG-ADT-000101\r"
    );
}

#[test]
fn exact_ae_with_err_segment() {
    let bytes = fixture("valid/adt_a01_admit.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    let err = AckError {
        code: ErrorCode::RequiredFieldMissing,
        location: Some(Location::field("PID", 1, 3)),
        severity: Severity::Error,
        message: Some("PID-3 missing".into()),
    };
    let ack = build_ack(&m, &opts(AckCode::AE, Some(&err)));
    assert_eq!(
        String::from_utf8(ack.clone()).unwrap(),
        "MSH|^~\\&|CAREBUS|REGIONLAB|EPICADT|NORTHGATE^1.2.840.114350.1.13.99^ISO|20261102083016||ACK^A01^ACK|CB-ACK-1|P|2.5.1\r\
         MSA|AE|NG-ADT-000101\r\
         ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 missing\r"
    );
    let parsed = parse_ack(&ack).unwrap();
    assert_eq!(parsed.code, AckCode::AE);
    assert_eq!(parsed.acknowledged_control_id, b"NG-ADT-000101");
    assert_eq!(parsed.text, None);
    assert_eq!(parsed.errors.len(), 1);
    let e = &parsed.errors[0];
    assert_eq!(e.code, Some(101));
    assert_eq!(e.severity.as_deref(), Some("E"));
    assert_eq!(e.location.as_deref(), Some("PID^1^3"));
    assert_eq!(e.text.as_deref(), Some("PID-3 missing"));
    assert_eq!(parsed.best_text(), Some("PID-3 missing"));
}

#[test]
fn msa2_equals_original_control_id_for_every_valid_fixture() {
    for name in common::fixture_names("valid") {
        let bytes = fixture(&format!("valid/{name}"));
        let m = Message::parse_strict(&bytes).unwrap();
        let ack = build_ack(&m, &opts(AckCode::CA, None));
        let parsed = parse_ack(&ack).unwrap();
        assert_eq!(parsed.code, AckCode::CA, "{name}");
        assert_eq!(
            parsed.acknowledged_control_id,
            m.control_id().unwrap().raw(),
            "{name}"
        );
        assert!(parsed.errors.is_empty());
        let a = &parsed.message;
        assert_eq!(
            a.delimiters(),
            m.delimiters(),
            "{name}: original delimiters"
        );
        assert_eq!(
            a.sending_application().map(|f| f.raw()),
            m.receiving_application().map(|f| f.raw())
        );
        assert_eq!(
            a.sending_facility().map(|f| f.raw()),
            m.receiving_facility().map(|f| f.raw())
        );
        assert_eq!(
            a.receiving_application().map(|f| f.raw()),
            m.sending_application().map(|f| f.raw())
        );
        assert_eq!(
            a.receiving_facility().map(|f| f.raw()),
            m.sending_facility().map(|f| f.raw())
        );
        assert_eq!(a.message_type().unwrap().raw(), b"ACK");
        assert_eq!(
            a.trigger_event().map(|c| c.raw()),
            m.trigger_event().map(|c| c.raw())
        );
        assert_eq!(a.message_structure().unwrap().raw(), b"ACK");
        assert_eq!(a.control_id().unwrap().raw(), b"CB-ACK-1");
        assert_eq!(a.date_time().unwrap().raw(), b"20261102083016");
        assert_eq!(
            a.msh_field(11).map(|f| f.raw()),
            m.msh_field(11).map(|f| f.raw())
        );
        assert_eq!(
            a.msh_field(12).map(|f| f.raw()),
            m.msh_field(12).map(|f| f.raw())
        );
        // The ACK is itself a valid message.
        a.validate().unwrap();
        assert!(ack.ends_with(b"\r") && !ack.contains(&b'\n'));
    }
}

#[test]
fn v27_ack_keeps_five_encoding_characters() {
    let bytes = fixture("valid/v27_truncation_char.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    let err = AckError {
        message: Some("value # truncated".into()),
        ..AckError::new(ErrorCode::ValueTooLong)
    };
    let ack = build_ack(&m, &opts(AckCode::CE, Some(&err)));
    assert!(ack.starts_with(b"MSH|^~\\&#|CAREBUS|NORTHGATE|DEVGW|ICU-7|"));
    let text = String::from_utf8(ack.clone()).unwrap();
    assert!(
        text.ends_with("ERR|||104^Value too long^HL70357|E||||value \\P\\ truncated\r"),
        "{text}"
    );
    let parsed = parse_ack(&ack).unwrap();
    assert_eq!(parsed.code, AckCode::CE);
    assert_eq!(parsed.errors[0].text.as_deref(), Some("value # truncated"));
    assert_eq!(parsed.errors[0].location, None);
}

#[test]
fn reject_from_validation_error_for_every_code() {
    for code in [AckCode::AE, AckCode::AR, AckCode::CE, AckCode::CR] {
        let bytes = fixture("invalid/empty_control_id.hl7");
        let m = Message::parse(&bytes).unwrap();
        let e = m.validate().unwrap_err();
        let err = AckError::from(&e);
        let ack = build_ack(&m, &opts(code, Some(&err)));
        let parsed = parse_ack(&ack).unwrap();
        assert_eq!(parsed.code, code);
        assert_eq!(
            parsed.acknowledged_control_id, b"",
            "original MSH-10 was empty"
        );
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].code, Some(101));
        assert_eq!(parsed.errors[0].location.as_deref(), Some("MSH^1^10"));
        assert_eq!(
            parsed.errors[0].text.as_deref(),
            Some("required field MSH-10 is missing")
        );
    }
}

#[test]
fn caller_text_is_escaped() {
    let bytes = fixture("valid/msh_only.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    let err = AckError {
        code: ErrorCode::ApplicationInternalError,
        location: None,
        severity: Severity::Fatal,
        message: Some("disk|full^now~really\\&\r\nretry".into()),
    };
    let ack = build_ack(
        &m,
        &AckOptions {
            code: AckCode::AR,
            control_id: "A|B",
            timestamp: "2026^01",
            error: Some(&err),
        },
    );
    let parsed = parse_ack(&ack).unwrap();
    assert_eq!(parsed.message.segment_count(), 3);
    assert_eq!(
        parsed.message.control_id().unwrap().decoded().as_ref(),
        b"A|B"
    );
    assert_eq!(
        parsed.message.date_time().unwrap().decoded().as_ref(),
        b"2026^01"
    );
    assert_eq!(
        parsed.errors[0].text.as_deref(),
        Some("disk|full^now~really\\&\r\nretry")
    );
    assert_eq!(parsed.errors[0].severity.as_deref(), Some("F"));
    assert_eq!(parsed.errors[0].code, Some(207));
}

#[test]
fn legacy_version_uses_err1_and_msa3() {
    let bytes = fixture("valid/orm_o01_order.hl7"); // HL7 2.3.1
    let m = Message::parse_strict(&bytes).unwrap();
    let err = AckError {
        code: ErrorCode::UnsupportedMessageType,
        location: Some(Location::field("MSH", 1, 9)),
        severity: Severity::Error,
        message: Some("ORM not routed".into()),
    };
    let ack = build_ack(&m, &opts(AckCode::AR, Some(&err)));
    assert_eq!(
        String::from_utf8(ack.clone()).unwrap(),
        "MSH|^~\\&|LABSYS|REGIONLAB|EPICORD|NORTHGATE|20261102083016||ACK^O01^ACK|CB-ACK-1|P|2.3.1\r\
         MSA|AR|NG-ORM-000881|ORM not routed\r\
         ERR|MSH^1^9^200&Unsupported message type&HL70357\r"
    );
    let parsed = parse_ack(&ack).unwrap();
    assert_eq!(parsed.text.as_deref(), Some("ORM not routed"));
    assert_eq!(parsed.best_text(), Some("ORM not routed"));
    assert_eq!(parsed.errors[0].code, Some(200));
    assert_eq!(parsed.errors[0].location.as_deref(), Some("MSH^1^9"));
}

#[test]
fn nack_without_header() {
    let e = Message::parse(&fixture("invalid/binary_junk.bin")).unwrap_err();
    assert_eq!(e, ParseError::MissingMsh);
    let err = AckError::from(&e);
    let ack = build_ack_without_header(&opts(AckCode::AR, Some(&err)));
    assert_eq!(
        String::from_utf8(ack.clone()).unwrap(),
        "MSH|^~\\&|||||20261102083016||ACK^^ACK|CB-ACK-1|P|2.5\r\
         MSA|AR|\r\
         ERR||MSH^1|100^Segment sequence error^HL70357|E||||message does not start with an MSH segment\r"
    );
    let parsed = parse_ack(&ack).unwrap();
    assert_eq!(parsed.code, AckCode::AR);
    assert_eq!(parsed.acknowledged_control_id, b"");
    assert_eq!(parsed.errors[0].code, Some(100));
    assert_eq!(parsed.errors[0].location.as_deref(), Some("MSH^1"));
    let plain = build_ack_without_header(&opts(AckCode::CR, None));
    assert_eq!(parse_ack(&plain).unwrap().code, AckCode::CR);
    assert!(parse_ack(&plain).unwrap().errors.is_empty());
}

#[test]
fn parse_ack_errors() {
    assert_eq!(parse_ack(b"").unwrap_err(), ParseError::Empty);
    assert_eq!(
        parse_ack(&fixture("valid/msh_only.hl7")).unwrap_err(),
        ParseError::MissingSegment { segment: "MSA" }
    );
    assert_eq!(
        parse_ack(b"MSH|^~\\&|A|B|C|D|1||ACK|1|P|2.5\rMSA|XX|1\r").unwrap_err(),
        ParseError::InvalidAckCode
    );
    assert_eq!(
        parse_ack(b"MSH|^~\\&|A|B|C|D|1||ACK|1|P|2.5\rMSA\r").unwrap_err(),
        ParseError::InvalidAckCode
    );
    assert_eq!(
        ParseError::InvalidAckCode.code(),
        ErrorCode::TableValueNotFound
    );
}

#[test]
fn parse_foreign_ack_with_lf_and_msa3() {
    let ack = b"MSH|^~\\&|EPIC|NORTHGATE|CAREBUS|REGIONLAB|20261102083020||ACK^R01|E-77|P|2.3\nMSA|AE|RL-ORU-5500001|Patient not found\nERR|PID^1^3^204&Unknown key identifier&HL70357\n";
    let parsed = parse_ack(ack).unwrap();
    assert_eq!(parsed.code, AckCode::AE);
    assert!(parsed.code.is_error());
    assert_eq!(parsed.acknowledged_control_id, b"RL-ORU-5500001");
    assert_eq!(parsed.text.as_deref(), Some("Patient not found"));
    assert_eq!(parsed.errors[0].code, Some(204));
    assert_eq!(parsed.errors[0].location.as_deref(), Some("PID^1^3"));
    assert_eq!(
        parsed.errors[0].text.as_deref(),
        Some("Unknown key identifier")
    );
}
