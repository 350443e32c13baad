//! Shared helpers for the integration tests: loading fixtures from
//! `fixtures/hl7` at the repository root.

#![allow(dead_code, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

/// Path of `fixtures/hl7/<rel>`.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/hl7")).join(rel)
}

/// Bytes of `fixtures/hl7/<rel>`, exactly as stored.
pub fn fixture(rel: &str) -> Vec<u8> {
    let path = fixture_path(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// File names in `fixtures/hl7/<dir>`, sorted.
pub fn fixture_names(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_path(dir))
        .expect("fixture dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Segment ids of a parsed message, as strings.
pub fn segment_ids(message: &carebus_hl7::Message<'_>) -> Vec<String> {
    message
        .segments()
        .map(|s| String::from_utf8_lossy(s.id()).into_owned())
        .collect()
}

/// Runs every parse entry point and accessor on `input`; used by the
/// no-panic property tests (the fuzz target does the same).
pub fn exercise_all(input: &[u8]) -> usize {
    use carebus_hl7::{
        AckCode, AckError, AckOptions, Message, build_ack, build_ack_without_header, escape,
        parse_ack, parse_batch,
    };
    let mut touched = 0usize;
    let options = |error| AckOptions {
        code: AckCode::AE,
        control_id: "C1",
        timestamp: "20260101",
        error,
    };
    match Message::parse(input) {
        Ok(m) => {
            let validation = m.validate();
            let err = validation.as_ref().err().map(AckError::from);
            let ack = build_ack(&m, &options(err.as_ref()));
            // Our own ACKs must always be readable.
            let parsed = parse_ack(&ack).expect("own ACK parses");
            assert_eq!(parsed.code, AckCode::AE);
            assert_eq!(
                parsed.acknowledged_control_id,
                m.control_id().map(|f| f.raw()).unwrap_or_default()
            );
            for f in [
                m.sending_application(),
                m.sending_facility(),
                m.receiving_application(),
                m.receiving_facility(),
                m.date_time(),
                m.control_id(),
                m.accept_ack_type(),
                m.application_ack_type(),
            ]
            .into_iter()
            .flatten()
            {
                touched += f.decoded().len();
            }
            for c in [
                m.message_type(),
                m.trigger_event(),
                m.message_structure(),
                m.processing_id(),
                m.version(),
                m.character_set(),
            ]
            .into_iter()
            .flatten()
            {
                touched += c.decoded_lossy().len();
            }
            let _ = (m.version_number(), m.declares_utf8());
            if let Some(p) = m.patient_identifier() {
                touched += p.key().len();
            }
            for s in m.segments() {
                let _ = s.id_str();
                for f in s.fields() {
                    touched += f.decoded().len();
                    for r in f.repetitions() {
                        for c in r.components() {
                            for sc in c.subcomponents() {
                                touched += sc.decoded().len();
                                let _ = (sc.decoded_str(), sc.is_null());
                            }
                        }
                    }
                }
            }
        }
        Err(e) => {
            let _ = (e.code(), e.location(), e.to_string());
            let err = AckError::from(&e);
            let ack = build_ack_without_header(&options(Some(&err)));
            assert!(parse_ack(&ack).is_ok());
        }
    }
    if let Ok(batch) = parse_batch(input) {
        let _ = batch.verify_counts();
        for m in batch.messages() {
            assert!(input.get(m.range.clone()) == Some(m.bytes));
            if let Ok(msg) = Message::parse(m.bytes) {
                let _ = msg.validate();
            }
        }
    }
    if let Ok(ack) = parse_ack(input) {
        touched += ack.errors.len();
        let _ = ack.best_text();
    }
    let d = carebus_hl7::Delimiters::DEFAULT;
    let decoded = escape::decode(input, &d);
    let encoded = escape::encode(&decoded, &d);
    assert_eq!(escape::decode(&encoded, &d), decoded);
    touched
}
