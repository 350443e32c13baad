//! HL7 batch files: `[FHS] { [BHS] { MSH … } [BTS] } [FTS]`.
//!
//! [`parse_batch`] splits a batch file into its messages, each returned as
//! a byte range and slice of the input that [`crate::Message::parse`] can
//! read on its own; the messages themselves are not parsed or validated.
//!
//! Accepted shapes: with or without FHS/FTS, with one or more BHS … BTS
//! groups, and (leniently) messages without any BHS (one implicit batch).
//! A BTS or FTS without a matching header is accepted when the structure
//! is otherwise unambiguous. Rejected ([`BatchError`]): empty input, a
//! non-envelope segment before the first MSH of a batch, FHS anywhere but
//! first, a BHS or FTS while a batch opened by BHS has no BTS yet, invalid
//! FHS/BHS delimiters, and anything after FTS.
//!
//! Counts are not checked by [`parse_batch`]; call
//! [`Batch::verify_counts`] to compare BTS-1 (messages per batch) and FTS-1
//! (batches per file) with what the file holds.

use std::ops::Range;

use crate::encoding::Delimiters;
use crate::error::BatchError;
use crate::message::{Field, Segment, segment_lines};
use crate::validate::is_valid_segment_id;

/// A file or batch header (FHS/BHS) or trailer (FTS/BTS) segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The segment (for FHS/BHS, field numbering is as for MSH).
    pub segment: Segment<'a>,
    /// Byte range of the segment in the input (without terminator).
    pub range: Range<usize>,
}

fn non_empty(f: Option<Field<'_>>) -> Option<Field<'_>> {
    f.filter(|f| !f.is_empty())
}

impl<'a> Envelope<'a> {
    /// FHS-3/BHS-3 sending application.
    pub fn sending_application(&self) -> Option<Field<'a>> {
        non_empty(self.segment.field(3))
    }

    /// FHS-4/BHS-4 sending facility.
    pub fn sending_facility(&self) -> Option<Field<'a>> {
        non_empty(self.segment.field(4))
    }

    /// FHS-7/BHS-7 creation date/time.
    pub fn date_time(&self) -> Option<Field<'a>> {
        non_empty(self.segment.field(7))
    }

    /// FHS-9/BHS-9 file or batch name/id/type.
    pub fn name(&self) -> Option<Field<'a>> {
        non_empty(self.segment.field(9))
    }

    /// FHS-11/BHS-11 file or batch control id.
    pub fn control_id(&self) -> Option<Field<'a>> {
        non_empty(self.segment.field(11))
    }

    /// FTS-1/BTS-1 count, `Ok(None)` if empty, `Err(())` if not a number.
    fn count(&self) -> Result<Option<u64>, ()> {
        match non_empty(self.segment.field(1)) {
            None => Ok(None),
            Some(f) => std::str::from_utf8(f.raw())
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map(Some)
                .ok_or(()),
        }
    }

    /// FTS-1 (batch count) or BTS-1 (message count) as a number, if it is one.
    pub fn declared_count(&self) -> Option<u64> {
        self.count().ok().flatten()
    }
}

/// One message of a batch, as bytes of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMessage<'a> {
    /// Byte range in the input: from `MSH` up to and including the last
    /// segment's terminator.
    pub range: Range<usize>,
    /// The same bytes.
    pub bytes: &'a [u8],
}

/// One BHS … BTS group (header/trailer absent in lenient inputs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchGroup<'a> {
    /// BHS, if present.
    pub header: Option<Envelope<'a>>,
    /// The messages, in order.
    pub messages: Vec<BatchMessage<'a>>,
    /// BTS, if present.
    pub trailer: Option<Envelope<'a>>,
}

/// A parsed batch file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch<'a> {
    /// FHS, if present.
    pub file_header: Option<Envelope<'a>>,
    /// The batches, in order.
    pub batches: Vec<BatchGroup<'a>>,
    /// FTS, if present.
    pub file_trailer: Option<Envelope<'a>>,
}

impl<'a> Batch<'a> {
    /// All messages of all batches, in order.
    pub fn messages(&self) -> impl Iterator<Item = &BatchMessage<'a>> + '_ {
        self.batches.iter().flat_map(|b| b.messages.iter())
    }

    /// Total number of messages.
    pub fn message_count(&self) -> usize {
        self.batches.iter().map(|b| b.messages.len()).sum()
    }

    /// Compares BTS-1 with each batch's message count and FTS-1 with the
    /// number of batches. Empty counts are not checked; non-numeric counts
    /// are [`BatchError::InvalidCount`].
    pub fn verify_counts(&self) -> Result<(), BatchError> {
        for (i, group) in self.batches.iter().enumerate() {
            let batch = i.saturating_add(1);
            if let Some(trailer) = &group.trailer {
                let declared = trailer.count().map_err(|()| BatchError::InvalidCount {
                    segment: "BTS",
                    batch,
                })?;
                let actual = group.messages.len() as u64;
                if let Some(declared) = declared.filter(|d| *d != actual) {
                    return Err(BatchError::CountMismatch {
                        segment: "BTS",
                        batch,
                        declared,
                        actual,
                    });
                }
            }
        }
        if let Some(trailer) = &self.file_trailer {
            let declared = trailer.count().map_err(|()| BatchError::InvalidCount {
                segment: "FTS",
                batch: 0,
            })?;
            let actual = self.batches.len() as u64;
            if let Some(declared) = declared.filter(|d| *d != actual) {
                return Err(BatchError::CountMismatch {
                    segment: "FTS",
                    batch: 0,
                    declared,
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// Parser state: where we are in the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before anything (FHS allowed).
    Start,
    /// Between batches (after FHS or BTS): BHS, MSH, FTS allowed.
    BetweenBatches,
    /// Inside a batch (after BHS or a message): MSH, BTS allowed, and
    /// message body segments once a message has started.
    InBatch,
    /// After FTS: nothing allowed.
    Done,
}

/// Splits a batch file into messages (see the module docs).
///
/// Rules: FHS only as the first segment; BHS starts a new batch (closing a
/// batch that has no BTS is an [`BatchError::UnbalancedEnvelope`] only if
/// that batch had a BHS); MSH starts a message, and every following
/// non-envelope segment belongs to it; BTS closes the current batch; FTS
/// ends the file and only empty lines may follow.
pub fn parse_batch(input: &[u8]) -> Result<Batch<'_>, BatchError> {
    let mut batch = Batch::default();
    let mut state = State::Start;
    let mut delims = Delimiters::DEFAULT;
    // Current group, and the start of the current message.
    let mut group: Option<BatchGroup<'_>> = None;
    let mut message_start: Option<usize> = None;
    let mut last_end = 0usize;
    let mut seen_any = false;

    // Closes the current message, if any, ending at `end`.
    fn close_message<'a>(
        input: &'a [u8],
        group: &mut Option<BatchGroup<'a>>,
        message_start: &mut Option<usize>,
        end: usize,
    ) {
        if let Some(start) = message_start.take() {
            let bytes = input.get(start..end).unwrap_or_default();
            group
                .get_or_insert_with(BatchGroup::default)
                .messages
                .push(BatchMessage {
                    range: start..end,
                    bytes,
                });
        }
    }

    for (index0, (content, full)) in segment_lines(input).enumerate() {
        let index = index0.saturating_add(1);
        seen_any = true;
        let raw = input.get(content.clone()).unwrap_or_default();
        let id = raw.get(..3).unwrap_or(raw);
        let unexpected = || BatchError::UnexpectedSegment {
            segment: if is_valid_segment_id(id) {
                String::from_utf8_lossy(id).into_owned()
            } else {
                String::new()
            },
            index,
        };
        let envelope = |segment| Envelope {
            segment,
            range: content.clone(),
        };
        match id {
            b"FHS" => {
                if state != State::Start {
                    return Err(unexpected());
                }
                delims = Delimiters::from_header_segment(raw).map_err(|source| {
                    BatchError::InvalidHeader {
                        segment: "FHS",
                        source,
                    }
                })?;
                batch.file_header = Some(envelope(Segment::parse(raw, delims)));
                state = State::BetweenBatches;
            }
            b"BHS" => {
                if state == State::Done {
                    return Err(unexpected());
                }
                close_message(input, &mut group, &mut message_start, last_end);
                if let Some(open) = group.take() {
                    if open.header.is_some() {
                        return Err(BatchError::UnbalancedEnvelope { index });
                    }
                    batch.batches.push(open);
                }
                delims = Delimiters::from_header_segment(raw).map_err(|source| {
                    BatchError::InvalidHeader {
                        segment: "BHS",
                        source,
                    }
                })?;
                group = Some(BatchGroup {
                    header: Some(envelope(Segment::parse(raw, delims))),
                    ..BatchGroup::default()
                });
                state = State::InBatch;
            }
            b"MSH" => {
                if state == State::Done {
                    return Err(unexpected());
                }
                close_message(input, &mut group, &mut message_start, last_end);
                if let Ok(d) = Delimiters::from_header_segment(raw) {
                    delims = d;
                }
                group.get_or_insert_with(BatchGroup::default);
                message_start = Some(content.start);
                state = State::InBatch;
            }
            b"BTS" => {
                if state != State::InBatch {
                    return Err(unexpected());
                }
                close_message(input, &mut group, &mut message_start, last_end);
                let mut closed = group.take().unwrap_or_default();
                closed.trailer = Some(envelope(Segment::parse(raw, delims)));
                batch.batches.push(closed);
                state = State::BetweenBatches;
            }
            b"FTS" => {
                if state == State::Done || state == State::Start {
                    return Err(unexpected());
                }
                close_message(input, &mut group, &mut message_start, last_end);
                if let Some(open) = group.take() {
                    if open.header.is_some() {
                        return Err(BatchError::UnbalancedEnvelope { index });
                    }
                    batch.batches.push(open);
                }
                batch.file_trailer = Some(envelope(Segment::parse(raw, delims)));
                state = State::Done;
            }
            _ => {
                if message_start.is_none() {
                    return Err(unexpected());
                }
            }
        }
        last_end = full.end;
    }
    if !seen_any {
        return Err(BatchError::Empty);
    }
    close_message(input, &mut group, &mut message_start, last_end);
    if let Some(open) = group.take() {
        batch.batches.push(open);
    }
    Ok(batch)
}

/// Convenience: [`parse_batch`] followed by [`Batch::verify_counts`].
pub fn parse_batch_strict(input: &[u8]) -> Result<Batch<'_>, BatchError> {
    let batch = parse_batch(input)?;
    batch.verify_counts()?;
    Ok(batch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const M1: &str = "MSH|^~\\&|A|B|C|D|2026||ORU^R01|1|P|2.5\rPID|1\r";
    const M2: &str = "MSH|^~\\&|A|B|C|D|2026||ORU^R01|2|P|2.5\rPID|2\r";

    #[test]
    fn plain_messages_without_envelope() {
        let input = format!("{M1}{M2}");
        let b = parse_batch(input.as_bytes()).unwrap();
        assert_eq!(b.batches.len(), 1);
        let msgs: Vec<_> = b.messages().map(|m| m.bytes).collect();
        assert_eq!(msgs, vec![M1.as_bytes(), M2.as_bytes()]);
        b.verify_counts().unwrap();
    }

    #[test]
    fn bhs_bts_without_file() {
        let input = format!("BHS|^~\\&|A\r{M1}{M2}BTS|2\r");
        let b = parse_batch_strict(input.as_bytes()).unwrap();
        assert!(b.file_header.is_none());
        assert_eq!(b.batches.len(), 1);
        assert_eq!(b.message_count(), 2);
        assert_eq!(
            b.batches[0].trailer.as_ref().unwrap().declared_count(),
            Some(2)
        );
    }

    #[test]
    fn count_mismatch_and_invalid_count() {
        let input = format!("BHS|^~\\&\r{M1}BTS|2\r");
        let b = parse_batch(input.as_bytes()).unwrap();
        assert_eq!(
            b.verify_counts(),
            Err(BatchError::CountMismatch {
                segment: "BTS",
                batch: 1,
                declared: 2,
                actual: 1
            })
        );
        let input = format!("FHS|^~\\&\rBHS|^~\\&\r{M1}BTS|1\rFTS|3\r");
        assert_eq!(
            parse_batch_strict(input.as_bytes()).unwrap_err(),
            BatchError::CountMismatch {
                segment: "FTS",
                batch: 0,
                declared: 3,
                actual: 1
            }
        );
        let input = format!("BHS|^~\\&\r{M1}BTS|x\r");
        assert_eq!(
            parse_batch_strict(input.as_bytes()).unwrap_err(),
            BatchError::InvalidCount {
                segment: "BTS",
                batch: 1
            }
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(parse_batch(b"").unwrap_err(), BatchError::Empty);
        assert_eq!(parse_batch(b"\r\n").unwrap_err(), BatchError::Empty);
        assert_eq!(
            parse_batch(b"PID|1\r").unwrap_err(),
            BatchError::UnexpectedSegment {
                segment: "PID".into(),
                index: 1
            }
        );
        let input = format!("{M1}FTS|1\r{M2}");
        assert_eq!(
            parse_batch(input.as_bytes()).unwrap_err(),
            BatchError::UnexpectedSegment {
                segment: "MSH".into(),
                index: 4
            }
        );
        let input = format!("BHS|^~\\&\r{M1}BHS|^~\\&\r{M2}");
        assert_eq!(
            parse_batch(input.as_bytes()).unwrap_err(),
            BatchError::UnbalancedEnvelope { index: 4 }
        );
        assert!(matches!(
            parse_batch(b"FHS|^^\\&\r").unwrap_err(),
            BatchError::InvalidHeader { segment: "FHS", .. }
        ));
    }
}
