//! Guards parsing and strict validation of every fixture in
//! `fixtures/hl7/valid`: each must parse and validate, and the fields a
//! receiver relies on (sender, control id, type, patient id, escapes,
//! repetitions, delimiters, line endings, charsets) must read correctly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use carebus_hl7::{Delimiters, Message};
use common::{fixture, fixture_names, segment_ids};

const VALID: &[&str] = &[
    "adt_a01_admit.hl7",
    "adt_a03_discharge.hl7",
    "adt_a08_update.hl7",
    "conflicting_resend.hl7",
    "crlf_line_endings.hl7",
    "lf_line_endings.hl7",
    "msh_only.hl7",
    "orm_o01_order.hl7",
    "oru_r01_cbc.hl7",
    "oru_r01_critical_potassium.hl7",
    "oru_radiology_escapes_repetitions.hl7",
    "same_control_id_other_facility.hl7",
    "utf8_names.hl7",
    "v27_truncation_char.hl7",
    "zsegment_and_trailing_delims.hl7",
];

fn raw<'a>(f: Option<impl Into<Raw<'a>>>) -> Option<&'a [u8]> {
    f.map(|f| f.into().0)
}

/// Helper so `raw()` works on both fields and components.
struct Raw<'a>(&'a [u8]);
impl<'a> From<carebus_hl7::Field<'a>> for Raw<'a> {
    fn from(f: carebus_hl7::Field<'a>) -> Self {
        Raw(f.raw())
    }
}
impl<'a> From<carebus_hl7::Component<'a>> for Raw<'a> {
    fn from(c: carebus_hl7::Component<'a>) -> Self {
        Raw(c.raw())
    }
}

#[test]
fn fixture_list_is_complete() {
    assert_eq!(fixture_names("valid"), VALID.to_vec());
}

#[test]
fn every_valid_fixture_parses_and_validates() {
    for name in VALID {
        let bytes = fixture(&format!("valid/{name}"));
        let msg = Message::parse_strict(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(msg.control_id().is_some(), "{name}: control id");
        assert!(msg.message_type().is_some(), "{name}: message type");
        assert_eq!(msg.msh().id(), b"MSH", "{name}");
    }
}

#[test]
fn adt_a01_header_fields() {
    let bytes = fixture("valid/adt_a01_admit.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(*m.delimiters(), Delimiters::DEFAULT);
    assert_eq!(raw(m.control_id()), Some(&b"NG-ADT-000101"[..]));
    assert_eq!(raw(m.sending_application()), Some(&b"EPICADT"[..]));
    let facility = m.sending_facility().unwrap();
    assert_eq!(facility.raw(), b"NORTHGATE^1.2.840.114350.1.13.99^ISO");
    assert_eq!(facility.component(1).unwrap().raw(), b"NORTHGATE");
    assert_eq!(
        facility.component(2).unwrap().raw(),
        b"1.2.840.114350.1.13.99"
    );
    assert_eq!(facility.component(3).unwrap().raw(), b"ISO");
    assert_eq!(raw(m.receiving_application()), Some(&b"CAREBUS"[..]));
    assert_eq!(raw(m.receiving_facility()), Some(&b"REGIONLAB"[..]));
    assert_eq!(raw(m.date_time()), Some(&b"20261102083015"[..]));
    assert_eq!(raw(m.message_type()), Some(&b"ADT"[..]));
    assert_eq!(raw(m.trigger_event()), Some(&b"A01"[..]));
    assert_eq!(raw(m.message_structure()), Some(&b"ADT_A01"[..]));
    assert_eq!(raw(m.processing_id()), Some(&b"P"[..]));
    assert_eq!(raw(m.version()), Some(&b"2.5.1"[..]));
    assert_eq!(m.version_number(), Some((2, 5)));
    assert_eq!(raw(m.accept_ack_type()), Some(&b"AL"[..]));
    assert_eq!(raw(m.application_ack_type()), Some(&b"NE"[..]));
    assert_eq!(raw(m.msh_field(17)), Some(&b"USA"[..]));
    assert_eq!(raw(m.character_set()), Some(&b"UNICODE UTF-8"[..]));
    assert!(m.declares_utf8());
    // MSH numbering: MSH-1 is the separator, MSH-2 the encoding characters.
    assert_eq!(m.msh().field(1).unwrap().raw(), b"|");
    assert_eq!(m.msh().field(2).unwrap().raw(), b"^~\\&");
    assert_eq!(m.msh().field_count(), 18);
}

#[test]
fn adt_a01_segments_and_patient() {
    let bytes = fixture("valid/adt_a01_admit.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(
        segment_ids(&m),
        ["MSH", "EVN", "PID", "PD1", "NK1", "PV1", "AL1", "DG1"]
    );
    let p = m.patient_identifier().unwrap();
    assert_eq!(p.id.raw(), b"MRN100234");
    assert_eq!(p.assigning_authority.unwrap().raw(), b"NORTHGATE");
    assert_eq!(p.key(), b"NORTHGATE\x1fMRN100234".to_vec());
    let pid3 = m.field("PID", 3).unwrap();
    assert_eq!(pid3.repetitions().count(), 2);
    let second = pid3.repetition(2).unwrap();
    assert_eq!(second.component(1).unwrap().raw(), b"987-65-4320");
    assert_eq!(second.component(4).unwrap().raw(), b"USSSA");
    assert_eq!(second.component(5).unwrap().raw(), b"SS");
    assert_eq!(
        pid3.repetition(1).unwrap().component(5).unwrap().raw(),
        b"MR"
    );
    let name = m.field("PID", 5).unwrap();
    assert_eq!(name.component(1).unwrap().decoded_lossy(), "Okafor");
    assert_eq!(name.component(2).unwrap().decoded_lossy(), "Adaeze");
    assert_eq!(m.segment("PID").unwrap().field_count(), 19);
    assert_eq!(m.segment("PV1").unwrap().field_count(), 44);
    assert_eq!(m.field("PV1", 44).unwrap().raw(), b"20261102082500");
    assert_eq!(
        m.field("DG1", 3).unwrap().component(2).unwrap().raw(),
        b"Pneumonia, unspecified organism"
    );
    assert!(m.segment("OBX").is_none());
}

#[test]
fn same_patient_across_adt_events() {
    let mut keys = Vec::new();
    for name in [
        "adt_a01_admit.hl7",
        "adt_a08_update.hl7",
        "adt_a03_discharge.hl7",
    ] {
        let bytes = fixture(&format!("valid/{name}"));
        let m = Message::parse_strict(&bytes).unwrap();
        keys.push(m.patient_identifier().unwrap().key());
    }
    assert!(keys.iter().all(|k| k == &keys[0]));
    let bytes = fixture("valid/adt_a03_discharge.hl7");
    let m = Message::parse(&bytes).unwrap();
    assert_eq!(raw(m.control_id()), Some(&b"NG-ADT-000177"[..]));
    assert_eq!(raw(m.trigger_event()), Some(&b"A03"[..]));
}

#[test]
fn same_control_id_other_facility_and_conflicting_resend() {
    let a01 = fixture("valid/adt_a01_admit.hl7");
    let other = fixture("valid/same_control_id_other_facility.hl7");
    let resend = fixture("valid/conflicting_resend.hl7");
    let a01 = Message::parse_strict(&a01).unwrap();
    let other = Message::parse_strict(&other).unwrap();
    let resend = Message::parse_strict(&resend).unwrap();
    assert_eq!(raw(a01.control_id()), raw(other.control_id()));
    assert_ne!(raw(a01.sending_facility()), raw(other.sending_facility()));
    assert_eq!(raw(other.sending_facility()), Some(&b"SOUTHPOINT"[..]));
    assert_eq!(raw(a01.control_id()), raw(resend.control_id()));
    assert_eq!(
        raw(a01.sending_application()),
        raw(resend.sending_application())
    );
    assert_eq!(raw(a01.sending_facility()), raw(resend.sending_facility()));
    assert_ne!(a01.raw(), resend.raw());
}

#[test]
fn radiology_escapes_and_repetitions() {
    let bytes = fixture("valid/oru_radiology_escapes_repetitions.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(raw(m.version()), Some(&b"2.4"[..]));
    let pid3 = m.field("PID", 3).unwrap();
    assert_eq!(pid3.repetitions().count(), 2);
    assert_eq!(
        pid3.repetition(2).unwrap().component(1).unwrap().raw(),
        b"H-77812"
    );
    assert_eq!(
        pid3.repetition(2).unwrap().component(4).unwrap().raw(),
        b"HOSPX"
    );
    let pid10 = m.field("PID", 10).unwrap();
    let races: Vec<_> = pid10
        .repetitions()
        .map(|r| r.component(2).unwrap().decoded_lossy())
        .collect();
    assert_eq!(races, ["White", "Not Hispanic"]);
    let family = m.field("PID", 5).unwrap().component(1).unwrap();
    assert_eq!(family.raw(), b"O'Brien\\T\\Sons");
    assert_eq!(family.decoded().as_ref(), b"O'Brien&Sons");
    // \T\ must not have split the component.
    assert_eq!(family.subcomponents().count(), 1);
    let obx5 = m.field("OBX", 5).unwrap();
    assert_eq!(
        obx5.repetitions().count(),
        1,
        "escaped \\R\\ is not a repetition"
    );
    assert_eq!(obx5.component(2), None, "escaped \\S\\ is not a component");
    assert_eq!(
        obx5.decoded_str().unwrap(),
        "FINDINGS: Heart size normal | no effusion.\nIMPRESSION: No acute process ^ see prior 2025\\11~final.\r\n"
    );
    assert_eq!(m.field("OBX", 11).unwrap().raw(), b"F");
}

#[test]
fn lf_and_crlf_line_endings() {
    let lf = fixture("valid/lf_line_endings.hl7");
    let crlf = fixture("valid/crlf_line_endings.hl7");
    assert!(!lf.contains(&b'\r'));
    assert!(crlf.windows(2).any(|w| w == b"\r\n"));
    let lf = Message::parse_strict(&lf).unwrap();
    let crlf = Message::parse_strict(&crlf).unwrap();
    assert_eq!(segment_ids(&lf), ["MSH", "PID", "OBR", "OBX"]);
    assert_eq!(segment_ids(&crlf), ["MSH", "PID", "OBX"]);
    assert_eq!(raw(lf.control_id()), Some(&b"SC-0000042"[..]));
    assert_eq!(raw(crlf.control_id()), Some(&b"SC-0000043"[..]));
    // No terminator byte leaks into any segment.
    for m in [&lf, &crlf] {
        for s in m.segments() {
            assert!(!s.raw().contains(&b'\r') && !s.raw().contains(&b'\n'));
        }
    }
    assert_eq!(lf.field("OBX", 8).unwrap().raw(), b"H");
    assert_eq!(crlf.field("OBX", 8).unwrap().raw(), b"N");
    assert_eq!(raw(crlf.version()), Some(&b"2.3"[..]));
}

#[test]
fn line_ending_variants_give_identical_segments() {
    let cr = fixture("valid/adt_a01_admit.hl7");
    let as_lf: Vec<u8> = cr
        .iter()
        .map(|&b| if b == b'\r' { b'\n' } else { b })
        .collect();
    let as_crlf: Vec<u8> = cr
        .iter()
        .flat_map(|&b| {
            if b == b'\r' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    let mut mixed = Vec::new();
    for (i, seg) in cr
        .split(|&b| b == b'\r')
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        if i > 0 {
            mixed.extend_from_slice([&b"\r"[..], b"\n", b"\r\n", b"\r\n\r\n"][i % 4]);
        }
        mixed.extend_from_slice(seg);
    }
    let reference: Vec<Vec<u8>> = Message::parse_strict(&cr)
        .unwrap()
        .segments()
        .map(|s| s.raw().to_vec())
        .collect();
    assert_eq!(reference.len(), 8);
    for variant in [&as_lf, &as_crlf, &mixed] {
        let m = Message::parse_strict(variant).unwrap();
        let segs: Vec<Vec<u8>> = m.segments().map(|s| s.raw().to_vec()).collect();
        assert_eq!(segs, reference);
    }
}

#[test]
fn utf8_names_decode() {
    let bytes = fixture("valid/utf8_names.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    // The fixture puts UNICODE UTF-8 in MSH-20 (shifted), accepted as a
    // declaration; MSH-18 itself is empty.
    assert!(m.declares_utf8());
    assert!(m.character_set().is_none());
    assert_eq!(m.msh().field(20).unwrap().raw(), b"UNICODE UTF-8");
    let name = m.field("PID", 5).unwrap();
    assert_eq!(
        name.component(1).unwrap().as_str(),
        Some("Müller-Lüdenscheidt")
    );
    assert_eq!(name.component(2).unwrap().decoded_str().unwrap(), "José");
    assert_eq!(name.component(3).unwrap().decoded_str().unwrap(), "Ñandú");
    let addr = m.field("PID", 11).unwrap();
    assert_eq!(addr.component(1).unwrap().as_str(), Some("Straße 7"));
    assert_eq!(addr.component(3).unwrap().as_str(), Some("Köln"));
    assert_eq!(addr.component(6).unwrap().as_str(), Some("DEU"));
    assert_eq!(raw(m.trigger_event()), Some(&b"A04"[..]));
}

#[test]
fn v27_truncation_character() {
    let bytes = fixture("valid/v27_truncation_char.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(*m.delimiters(), Delimiters::DEFAULT_V27);
    assert_eq!(m.delimiters().truncation, Some(b'#'));
    assert_eq!(m.msh().field(2).unwrap().raw(), b"^~\\&#");
    // MSH-3 follows the five encoding characters.
    assert_eq!(raw(m.sending_application()), Some(&b"DEVGW"[..]));
    assert_eq!(raw(m.sending_facility()), Some(&b"ICU-7"[..]));
    assert_eq!(raw(m.date_time()), Some(&b"20261103101500.123+0100"[..]));
    assert_eq!(raw(m.control_id()), Some(&b"ICU7-VITALS-000000912"[..]));
    assert_eq!(raw(m.version()), Some(&b"2.7"[..]));
    assert_eq!(m.version_number(), Some((2, 7)));
    let obx: Vec<_> = m.segments_by_id("OBX").collect();
    assert_eq!(obx.len(), 3);
    assert_eq!(obx[1].field(5).unwrap().raw(), b"91");
    assert_eq!(
        obx[1].field(6).unwrap().component(2).unwrap().raw(),
        b"percent"
    );
    assert_eq!(
        obx[2].field(6).unwrap().component(1).unwrap().raw(),
        b"mm[Hg]"
    );
}

#[test]
fn zsegment_and_trailing_delimiters() {
    let bytes = fixture("valid/zsegment_and_trailing_delims.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(segment_ids(&m), ["MSH", "PID", "ZPI", "PV1"]);
    assert_eq!(m.msh().field_count(), 19);
    assert!(m.msh_field(13).is_none());
    assert!(m.msh().field(19).unwrap().is_empty());
    assert!(m.character_set().is_none());
    let pid = m.segment("PID").unwrap();
    assert_eq!(pid.field_count(), 29);
    assert!(pid.field(29).unwrap().is_empty());
    assert!(pid.field(30).is_none());
    let zpi = m.segment("ZPI").unwrap();
    assert_eq!(zpi.field_count(), 5);
    assert_eq!(zpi.field(2).unwrap().component(1).unwrap().raw(), b"VIP");
    assert_eq!(zpi.field(2).unwrap().component(2).unwrap().raw(), b"Y");
    assert_eq!(zpi.field(3).unwrap().raw(), b"BADGE-0042");
    assert!(zpi.field(5).unwrap().is_empty());
    assert_eq!(m.segment("PV1").unwrap().field_count(), 3);
    assert_eq!(raw(m.message_type()), Some(&b"ADT"[..]));
    assert!(m.message_structure().is_none());
}

#[test]
fn msh_only() {
    let bytes = fixture("valid/msh_only.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(m.segment_count(), 1);
    assert_eq!(raw(m.control_id()), Some(&b"NG-PING-1"[..]));
    assert_eq!(raw(m.message_type()), Some(&b"ACK"[..]));
    assert!(m.patient_identifier().is_none());
}

#[test]
fn lab_results_and_orders() {
    let bytes = fixture("valid/oru_r01_cbc.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    let values: Vec<_> = m
        .segments_by_id("OBX")
        .map(|o| o.field(5).unwrap().decoded_lossy())
        .collect();
    assert_eq!(values, ["13.8", "4.21", "12.6", "37.9", "312"]);
    assert_eq!(
        m.field("NTE", 3).unwrap().decoded_lossy(),
        "Specimen slightly hemolyzed; results verified."
    );
    assert_eq!(raw(m.sending_application()), Some(&b"LABSYS"[..]));

    let bytes = fixture("valid/oru_r01_critical_potassium.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(m.field("OBX", 8).unwrap().raw(), b"HH");
    assert_eq!(m.patient_identifier().unwrap().id.raw(), b"MRN200871");

    let bytes = fixture("valid/orm_o01_order.hl7");
    let m = Message::parse_strict(&bytes).unwrap();
    assert_eq!(raw(m.version()), Some(&b"2.3.1"[..]));
    assert_eq!(m.version_number(), Some((2, 3)));
    assert_eq!(raw(m.message_structure()), Some(&b"ORM_O01"[..]));
    let orc7 = m.field("ORC", 7).unwrap();
    assert_eq!(orc7.component(4).unwrap().raw(), b"20261102100000");
    assert_eq!(orc7.component(6).unwrap().raw(), b"R");
}
