//! MLLP framing: `0x0B` message `0x1C 0x0D`.
//!
//! The decoder reassembles frames split across reads and yields several frames from one
//! read; it skips bytes outside frames (reported, not lost silently) and a frame cut
//! short by a new start byte, accepts a frame
//! whose final `0x0D` is missing when the next frame starts right away or the
//! connection ends, and refuses a frame longer than its limit.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Start of a frame.
pub const START: u8 = 0x0B;
/// End of a frame (followed by [`CR`]).
pub const END: u8 = 0x1C;
/// Carriage return after [`END`].
pub const CR: u8 = 0x0D;

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A message's bytes, without framing.
    Message(Bytes),
    /// Bytes outside any frame were skipped (count).
    Skipped(usize),
}

/// Why a stream cannot be decoded further.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame is larger than the limit (its bytes so far are dropped).
    #[error("MLLP frame larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The connection ended inside a frame.
    #[error("connection ended inside an MLLP frame ({0} bytes)")]
    Truncated(usize),
    /// I/O error of the transport.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The MLLP codec.
#[derive(Debug, Clone)]
pub struct MllpCodec {
    max_frame: usize,
    /// Bytes of the current buffer already searched for END (no END there).
    scanned: usize,
}

impl MllpCodec {
    /// A codec refusing frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        MllpCodec {
            max_frame,
            scanned: 0,
        }
    }
}

impl Decoder for MllpCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        // Skip anything before a frame start.
        if src.first().is_some_and(|&b| b != START) {
            let skip = src.iter().position(|&b| b == START).unwrap_or(src.len());
            src.advance(skip);
            self.scanned = 0;
            return Ok(Some(Frame::Skipped(skip)));
        }
        if src.is_empty() {
            return Ok(None);
        }
        // src[0] == START: look for END after what was already scanned. A second START
        // before any END means the sender restarted (its frame was cut): the partial
        // frame is dropped (reported as skipped) and decoding resumes at the new START.
        let from = self.scanned.max(1);
        let marker = src
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == END || b == START));
        if let Some(rel) = marker
            && src.get(from + rel) == Some(&START)
        {
            let skip = from + rel;
            src.advance(skip);
            self.scanned = 0;
            return Ok(Some(Frame::Skipped(skip)));
        }
        let Some(rel) = marker else {
            self.scanned = src.len();
            if src.len().saturating_sub(1) > self.max_frame {
                self.scanned = 0;
                let dropped = src.len();
                src.advance(dropped);
                return Err(FrameError::TooLarge {
                    limit: self.max_frame,
                });
            }
            return Ok(None);
        };
        let end = from + rel;
        if end - 1 > self.max_frame {
            self.scanned = 0;
            src.advance(end + 1);
            return Err(FrameError::TooLarge {
                limit: self.max_frame,
            });
        }
        match src.get(end + 1) {
            None => {
                // END is the last byte so far: wait for the CR (or the next frame / EOF).
                self.scanned = end;
                Ok(None)
            }
            Some(&next) => {
                let mut frame = src.split_to(end + 1);
                if next == CR {
                    src.advance(1);
                }
                // A missing CR is tolerated: the next byte stays for the next frame.
                self.scanned = 0;
                frame.advance(1);
                frame.truncate(frame.len() - 1);
                Ok(Some(Frame::Message(frame.freeze())))
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        // At the end of the stream a final END without its CR still closes the frame.
        if src.first() == Some(&START) && src.last() == Some(&END) && src.len() >= 2 {
            let mut frame = src.split_to(src.len());
            frame.advance(1);
            frame.truncate(frame.len() - 1);
            self.scanned = 0;
            return Ok(Some(Frame::Message(frame.freeze())));
        }
        let n = src.len();
        src.advance(n);
        self.scanned = 0;
        Err(FrameError::Truncated(n))
    }
}

impl Encoder<&[u8]> for MllpCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(item.len() + 3);
        dst.extend_from_slice(&[START]);
        dst.extend_from_slice(item);
        dst.extend_from_slice(&[END, CR]);
        Ok(())
    }
}

/// Frames one message.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 3);
    out.push(START);
    out.extend_from_slice(message);
    out.extend_from_slice(&[END, CR]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]], max: usize) -> (Vec<Frame>, Option<String>) {
        let mut codec = MllpCodec::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(f)) => out.push(f),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e.to_string())),
                }
            }
        }
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn frames_split_across_reads_and_several_in_one_read() {
        let wire = [frame(b"MSH|a"), frame(b"MSH|b")].concat();
        for cut in 0..wire.len() {
            let (frames, err) = decode_all(&[&wire[..cut], &wire[cut..]], 100);
            assert!(err.is_none());
            assert_eq!(frames, vec![msg("MSH|a"), msg("MSH|b")], "cut at {cut}");
        }
        let (frames, _) = decode_all(&[&wire], 100);
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn garbage_between_frames_is_skipped_and_reported() {
        let wire = [b"junk".to_vec(), frame(b"A"), b"\r\n".to_vec(), frame(b"B")].concat();
        let (frames, err) = decode_all(&[&wire], 100);
        assert!(err.is_none());
        assert_eq!(
            frames,
            vec![Frame::Skipped(4), msg("A"), Frame::Skipped(2), msg("B")]
        );
    }

    #[test]
    fn a_frame_cut_short_by_a_new_start_is_dropped_and_the_new_one_read() {
        let wire = [b"\x0bMSH|cut".to_vec(), frame(b"MSH|whole")].concat();
        let (frames, err) = decode_all(&[&wire], 100);
        assert!(err.is_none());
        assert_eq!(frames, vec![Frame::Skipped(8), msg("MSH|whole")]);
    }

    #[test]
    fn a_missing_final_cr_is_tolerated() {
        let wire = [b"\x0bA\x1c".to_vec(), frame(b"B"), b"\x0bC\x1c".to_vec()].concat();
        let (frames, err) = decode_all(&[&wire], 100);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(frames, vec![msg("A"), msg("B"), msg("C")]);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let big = frame(&[b'x'; 200]);
        let (_, err) = decode_all(&[&big], 100);
        assert!(err.unwrap().contains("larger than 100"));
        let (_, err) = decode_all(&[&[START; 1][..], b"partial"], 100);
        assert!(err.unwrap().contains("ended inside"));
        // Without any end in sight, the limit still applies while reading.
        let mut codec = MllpCodec::new(10);
        let mut buf = BytesMut::from(
            &[
                START, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h', b'i', b'j', b'k',
            ][..],
        );
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_in_any_chunks_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), cut in 0usize..300) {
            let cut = cut.min(data.len());
            let _ = decode_all(&[&data[..cut], &data[cut..]], 64);
        }

        #[test]
        fn framed_messages_come_back_whole(msgs in proptest::collection::vec(proptest::collection::vec(0x20u8..0x7f, 1..50), 1..5), cut in 0usize..400) {
            let wire: Vec<u8> = msgs.iter().flat_map(|m| frame(m)).collect();
            let cut = cut.min(wire.len());
            let (frames, err) = decode_all(&[&wire[..cut], &wire[cut..]], 1000);
            proptest::prop_assert!(err.is_none());
            let expected: Vec<Frame> = msgs.iter().map(|m| Frame::Message(Bytes::copy_from_slice(m))).collect();
            proptest::prop_assert_eq!(frames, expected);
        }
    }
}
