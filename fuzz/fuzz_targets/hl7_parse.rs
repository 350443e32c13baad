//! Fuzz target: every carebus-hl7 parse entry point on arbitrary bytes.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer=none hl7_parse`
//! (seed the corpus with `cp ../fixtures/hl7/*/* corpus/hl7_parse/`).
//! Besides "no panic", it checks invariants: ACKs built by the crate parse
//! back with the right code and MSA-2, batch message slices match their
//! ranges, and escape decoding of an encoding round-trips.

#![no_main]

use carebus_hl7::{
    AckCode, AckError, AckOptions, Delimiters, Message, build_ack, build_ack_without_header,
    escape, parse_ack, parse_batch,
};
use libfuzzer_sys::fuzz_target;

fn options(error: Option<&AckError>) -> AckOptions<'_> {
    AckOptions {
        code: AckCode::AE,
        control_id: "FUZZ-1",
        timestamp: "20260101000000",
        error,
    }
}

fn walk(m: &Message<'_>) -> usize {
    let mut n = 0usize;
    for s in m.segments() {
        let _ = s.id_str();
        for f in s.fields() {
            n = n.wrapping_add(f.decoded().len());
            for r in f.repetitions() {
                for c in r.components() {
                    let _ = c.decoded_str();
                    for sc in c.subcomponents() {
                        n = n.wrapping_add(sc.decoded_lossy().len());
                    }
                }
            }
        }
    }
    n
}

fuzz_target!(|data: &[u8]| {
    match Message::parse(data) {
        Ok(m) => {
            let validation = m.validate();
            let err = validation.as_ref().err().map(AckError::from);
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
                let _ = f.decoded();
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
                let _ = c.decoded_lossy();
            }
            let _ = (m.version_number(), m.declares_utf8());
            if let Some(p) = m.patient_identifier() {
                let _ = p.key();
            }
            let _ = walk(&m);
            let ack = build_ack(&m, &options(err.as_ref()));
            let parsed = parse_ack(&ack).expect("own ACK must parse");
            assert_eq!(parsed.code, AckCode::AE);
            assert_eq!(
                parsed.acknowledged_control_id,
                m.control_id().map(|f| f.raw()).unwrap_or_default()
            );
        }
        Err(e) => {
            let _ = (e.code(), e.location(), e.to_string());
            let err = AckError::from(&e);
            let ack = build_ack_without_header(&options(Some(&err)));
            assert!(parse_ack(&ack).is_ok());
        }
    }
    if let Ok(batch) = parse_batch(data) {
        let _ = batch.verify_counts();
        for m in batch.messages() {
            assert!(data.get(m.range.clone()) == Some(m.bytes));
            if let Ok(msg) = Message::parse(m.bytes) {
                let _ = msg.validate();
                let _ = walk(&msg);
            }
        }
    }
    if let Ok(ack) = parse_ack(data) {
        let _ = (ack.best_text(), ack.errors.len());
    }
    for d in [Delimiters::DEFAULT, Delimiters::DEFAULT_V27] {
        let decoded = escape::decode(data, &d);
        let encoded = escape::encode(&decoded, &d);
        assert_eq!(escape::decode(&encoded, &d), decoded);
        let encoded_raw = escape::encode(data, &d);
        assert_eq!(escape::decode(&encoded_raw, &d).as_ref(), data);
    }
});
