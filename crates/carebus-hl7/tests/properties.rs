//! Property tests guarding robustness and correctness on generated input:
//! no parse entry point panics on arbitrary or mutated bytes; escape
//! encoding round-trips; generated well-formed messages (any delimiters,
//! any line endings) parse back to the generated field values; ACKs built
//! for them parse back to the same code and control id.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use carebus_hl7::{
    AckCode, AckError, AckOptions, Delimiters, ErrorCode, Message, build_ack, escape, parse_ack,
    parse_batch_strict,
};
use proptest::prelude::*;

/// Every fixture, valid, invalid and batch, as mutation seeds.
fn seeds() -> Vec<Vec<u8>> {
    ["valid", "invalid", "batch"]
        .iter()
        .flat_map(|dir| {
            common::fixture_names(dir)
                .into_iter()
                .map(move |n| common::fixture(&format!("{dir}/{n}")))
        })
        .collect()
}

/// Bytes that matter to the parser, to bias mutations.
const INTERESTING: &[u8] = b"|^~\\&#\r\nMSHPIDBTSFHSXF.0\x00\xff";

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![any::<u8>(), proptest::sample::select(INTERESTING)];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = data.len();
        match *m {
            Mutation::Set(i, b) if len > 0 => data[i % len] = b,
            Mutation::Insert(i, b) => data.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                data.remove(i % len);
            }
            Mutation::Truncate(i) => data.truncate(i % (len + 1)),
            Mutation::Duplicate(i, n) if len > 0 => {
                let start = i % len;
                let end = (start + n).min(len);
                let chunk = data[start..end].to_vec();
                data.splice(start..start, chunk);
            }
            _ => {}
        }
    }
    data
}

/// A valid, consistent delimiter set: distinct ASCII punctuation (not `.`,
/// which versions and OIDs use), field separator `|` half of the time.
fn delimiters() -> impl Strategy<Value = Delimiters> {
    let punct: Vec<u8> = (0x21u8..0x7f)
        .filter(|b| !b.is_ascii_alphanumeric() && *b != b'|' && *b != b'.')
        .collect();
    (
        proptest::sample::subsequence(punct, 6).prop_shuffle(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(chars, pipe, truncation)| Delimiters {
            field: if pipe { b'|' } else { chars[0] },
            component: chars[1],
            repetition: chars[2],
            escape: chars[3],
            subcomponent: chars[4],
            truncation: truncation.then_some(chars[5]),
        })
}

/// Identifier-like text without any delimiter.
fn ident() -> impl Strategy<Value = String> {
    "[A-Z0-9]{1,16}"
}

fn terminator() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec!["\r", "\n", "\r\n"])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_panic_on_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        common::exercise_all(&input);
    }

    #[test]
    fn no_panic_on_msh_prefixed_bytes(
        tail in proptest::collection::vec(prop_oneof![any::<u8>(), proptest::sample::select(INTERESTING)], 0..512)
    ) {
        let mut input = b"MSH|^~\\&|".to_vec();
        input.extend_from_slice(&tail);
        common::exercise_all(&input);
    }

    #[test]
    fn no_panic_on_mutated_fixtures(
        seed in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..12),
    ) {
        let seeds = seeds();
        let input = apply(seeds[seed.index(seeds.len())].clone(), &mutations);
        common::exercise_all(&input);
    }

    #[test]
    fn escape_round_trips(text in proptest::collection::vec(any::<u8>(), 0..256), d in delimiters()) {
        let encoded = escape::encode(&text, &d);
        prop_assert!(!encoded.iter().any(|&b| b == d.field || b == d.component || b == d.repetition
            || b == d.subcomponent || (b < 0x20 && b != b'\t') || Some(b) == d.truncation));
        prop_assert_eq!(escape::decode(&encoded, &d).into_owned(), text);
    }

    #[test]
    fn plain_text_is_unchanged(text in "[A-Za-z0-9 .,:;()/+*=-]{0,64}", d in delimiters()) {
        prop_assume!(!text.bytes().any(|b| d.is_special(b)));
        prop_assert_eq!(escape::encode(text.as_bytes(), &d).into_owned(), text.as_bytes().to_vec());
        prop_assert_eq!(escape::decode(text.as_bytes(), &d).into_owned(), text.as_bytes().to_vec());
        let decoded = escape::decode(text.as_bytes(), &d);
        prop_assert_eq!(escape::encode(&decoded, &d).into_owned(), text.as_bytes().to_vec());
    }

    #[test]
    fn generated_messages_parse_back(
        d in delimiters(),
        term in terminator(),
        app in ident(), facility in ident(), control in ident(), mtype in "[A-Z]{3}",
        trigger in "[A-Z][0-9]{2}", version in proptest::sample::select(vec!["2.3", "2.4", "2.5.1", "2.7", "2.8"]),
        mrn in ident(), authority in ident(),
        free_text in proptest::collection::vec(any::<u8>(), 0..64),
        obx_count in 0usize..5,
        final_terminator in any::<bool>(),
    ) {
        let f = d.field as char;
        let c = d.component as char;
        let r = d.repetition as char;
        let enc = String::from_utf8(d.encoding_characters()).unwrap();
        let mut msg = format!(
            "MSH{f}{enc}{f}{app}{f}{facility}{c}1.2.3{c}ISO{f}RCV{f}RCVFAC{f}20260101120000{f}{f}{mtype}{c}{trigger}{f}{control}{f}P{f}{version}"
        ).into_bytes();
        msg.extend_from_slice(term.as_bytes());
        msg.extend_from_slice(format!("PID{f}1{f}{f}{mrn}{c}{c}{c}{authority}{r}OTHER{c}{c}{c}X{f}").as_bytes());
        msg.extend_from_slice(term.as_bytes());
        for i in 1..=obx_count {
            msg.extend_from_slice(format!("OBX{f}{i}{f}TX{f}{f}{f}").as_bytes());
            escape::encode_into(&free_text, &d, &mut msg);
            if i < obx_count || final_terminator {
                msg.extend_from_slice(term.as_bytes());
            }
        }
        let m = Message::parse_strict(&msg).unwrap();
        prop_assert_eq!(m.delimiters(), &d);
        prop_assert_eq!(m.segment_count(), 2 + obx_count);
        prop_assert_eq!(m.sending_application().unwrap().raw(), app.as_bytes());
        let fac = m.sending_facility().unwrap();
        prop_assert_eq!(fac.component(1).unwrap().raw(), facility.as_bytes());
        prop_assert_eq!(fac.component(3).unwrap().raw(), b"ISO");
        prop_assert_eq!(m.control_id().unwrap().raw(), control.as_bytes());
        prop_assert_eq!(m.message_type().unwrap().raw(), mtype.as_bytes());
        prop_assert_eq!(m.trigger_event().unwrap().raw(), trigger.as_bytes());
        prop_assert_eq!(m.version().unwrap().raw(), version.as_bytes());
        let p = m.patient_identifier().unwrap();
        prop_assert_eq!(p.id.raw(), mrn.as_bytes());
        prop_assert_eq!(p.assigning_authority.unwrap().raw(), authority.as_bytes());
        prop_assert_eq!(m.field("PID", 3).unwrap().repetition(2).unwrap().component(4).unwrap().raw(), b"X");
        for (i, obx) in m.segments_by_id("OBX").enumerate() {
            prop_assert_eq!(obx.field(1).unwrap().raw().to_vec(), (i + 1).to_string().into_bytes());
            prop_assert_eq!(obx.field(5).map(|f| f.decoded().into_owned()).unwrap_or_default(), free_text.clone());
        }

        // The batch splitter sees one message, identical bytes.
        let batch = parse_batch_strict(&msg).unwrap();
        prop_assert_eq!(batch.message_count(), 1);
        prop_assert_eq!(batch.messages().next().unwrap().bytes, &msg[..]);

        // ACK round trip with the generated delimiters and arbitrary error text.
        let text = String::from_utf8_lossy(&free_text).into_owned();
        let err = AckError { message: Some(text.clone()), ..AckError::new(ErrorCode::DataTypeError) };
        for code in [AckCode::AA, AckCode::AE, AckCode::AR, AckCode::CA, AckCode::CE, AckCode::CR] {
            let ack = build_ack(&m, &AckOptions { code, control_id: "ACK|1", timestamp: "20260101", error: Some(&err) });
            let parsed = parse_ack(&ack).unwrap();
            prop_assert_eq!(parsed.code, code);
            prop_assert_eq!(parsed.acknowledged_control_id, control.as_bytes());
            prop_assert_eq!(parsed.message.delimiters(), &d);
            prop_assert_eq!(parsed.message.control_id().unwrap().decoded().into_owned(), b"ACK|1".to_vec());
            prop_assert_eq!(parsed.errors.len(), 1);
            prop_assert_eq!(parsed.errors[0].code, Some(102));
            prop_assert_eq!(parsed.best_text(), Some(if text.is_empty() { "Data type error" } else { text.as_str() }));
            parsed.message.validate().unwrap();
        }
    }
}

#[test]
fn seeds_are_loaded() {
    assert_eq!(seeds().len(), 25);
    assert_eq!(common::exercise_all(b""), 0);
    assert!(common::exercise_all(&common::fixture("valid/adt_a01_admit.hl7")) > 500);
}
