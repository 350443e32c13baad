//! Guards batch-file splitting: the `lab_batch` fixture (FHS/BHS … BTS/FTS
//! with three ORU messages) yields its header/trailer info and three
//! independently parseable messages, and BTS-1/FTS-1 counts are checked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use carebus_hl7::{BatchError, Message, parse_batch, parse_batch_strict};
use common::{fixture, fixture_names};

#[test]
fn fixture_list_is_complete() {
    assert_eq!(fixture_names("batch"), ["lab_batch.hl7"]);
}

#[test]
fn lab_batch_has_three_messages() {
    let bytes = fixture("batch/lab_batch.hl7");
    let batch = parse_batch_strict(&bytes).unwrap();

    let fhs = batch.file_header.as_ref().unwrap();
    assert_eq!(fhs.segment.id(), b"FHS");
    assert_eq!(fhs.sending_application().unwrap().raw(), b"LABSYS");
    assert_eq!(fhs.sending_facility().unwrap().raw(), b"REGIONLAB");
    assert_eq!(fhs.date_time().unwrap().raw(), b"20261103235900");
    assert_eq!(fhs.name().unwrap().raw(), b"LABFILE-20261103");
    assert!(fhs.control_id().is_none());
    assert_eq!(&bytes[fhs.range.clone()], fhs.segment.raw());
    assert_eq!(
        batch.file_trailer.as_ref().unwrap().declared_count(),
        Some(1)
    );

    assert_eq!(batch.batches.len(), 1);
    let group = &batch.batches[0];
    assert_eq!(
        group.header.as_ref().unwrap().name().unwrap().raw(),
        b"BATCH-1"
    );
    assert_eq!(group.trailer.as_ref().unwrap().declared_count(), Some(3));
    assert_eq!(batch.message_count(), 3);

    let mut ids = Vec::new();
    for m in batch.messages() {
        assert_eq!(&bytes[m.range.clone()], m.bytes);
        assert!(m.bytes.starts_with(b"MSH|"));
        assert!(m.bytes.ends_with(b"\r"));
        let msg = Message::parse_strict(m.bytes).unwrap();
        assert_eq!(msg.segment_count(), 3);
        ids.push(String::from_utf8(msg.control_id().unwrap().raw().to_vec()).unwrap());
    }
    assert_eq!(ids, ["RL-B1-0001", "RL-B1-0002", "RL-B1-0003"]);
    let third = Message::parse(batch.messages().nth(2).unwrap().bytes).unwrap();
    assert_eq!(third.patient_identifier().unwrap().id.raw(), b"MRN300045");
}

#[test]
fn messages_cover_everything_between_headers_and_trailers() {
    let bytes = fixture("batch/lab_batch.hl7");
    let batch = parse_batch(&bytes).unwrap();
    let first = batch.messages().next().unwrap().range.start;
    let last = batch.messages().last().unwrap().range.end;
    let joined: Vec<u8> = batch.messages().flat_map(|m| m.bytes.to_vec()).collect();
    assert_eq!(joined, &bytes[first..last]);
    assert!(bytes[..first].starts_with(b"FHS|"));
    assert!(bytes[last..].starts_with(b"BTS|3\r"));
}

#[test]
fn bts_count_mismatch_is_reported() {
    let bytes = fixture("batch/lab_batch.hl7");
    let tampered = String::from_utf8(bytes).unwrap().replace("BTS|3", "BTS|4");
    let batch = parse_batch(tampered.as_bytes()).unwrap();
    assert_eq!(batch.message_count(), 3);
    let err = batch.verify_counts().unwrap_err();
    assert_eq!(
        err,
        BatchError::CountMismatch {
            segment: "BTS",
            batch: 1,
            declared: 4,
            actual: 3
        }
    );
    assert_eq!(err.to_string(), "BTS-1 declares 4 but the batch holds 3");
    assert_eq!(parse_batch_strict(tampered.as_bytes()).unwrap_err(), err);
}

#[test]
fn batch_without_file_envelope_and_with_lf() {
    let bytes = fixture("batch/lab_batch.hl7");
    let text = String::from_utf8(bytes).unwrap();
    let inner: String = text
        .split('\r')
        .filter(|s| !s.is_empty() && !s.starts_with("FHS") && !s.starts_with("FTS"))
        .map(|s| format!("{s}\n"))
        .collect();
    let batch = parse_batch_strict(inner.as_bytes()).unwrap();
    assert!(batch.file_header.is_none() && batch.file_trailer.is_none());
    assert_eq!(batch.message_count(), 3);
    for m in batch.messages() {
        assert!(m.bytes.ends_with(b"\n"));
        Message::parse_strict(m.bytes).unwrap();
    }
}

#[test]
fn single_message_is_a_degenerate_batch() {
    let bytes = fixture("valid/adt_a01_admit.hl7");
    let batch = parse_batch_strict(&bytes).unwrap();
    assert_eq!(batch.message_count(), 1);
    assert_eq!(batch.messages().next().unwrap().bytes, &bytes[..]);
}

#[test]
fn invalid_fixtures_are_not_batches() {
    assert_eq!(
        parse_batch(&fixture("invalid/empty.hl7")).unwrap_err(),
        BatchError::Empty
    );
    assert!(matches!(
        parse_batch(&fixture("invalid/no_msh.hl7")).unwrap_err(),
        BatchError::UnexpectedSegment { index: 1, .. }
    ));
    assert!(matches!(
        parse_batch(&fixture("invalid/binary_junk.bin")).unwrap_err(),
        BatchError::UnexpectedSegment { index: 1, .. }
    ));
}
