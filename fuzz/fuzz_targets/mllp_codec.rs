//! The MLLP framer on arbitrary bytes, split at an arbitrary point: never panics,
//! never yields a frame containing a frame marker, never loses the stream's position.
#![no_main]

use bytes::BytesMut;
use carebus_mllp::{Frame, MllpCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let mut codec = MllpCodec::new(256);
    let mut buf = BytesMut::new();
    for chunk in [&rest[..cut], &rest[cut..]] {
        buf.extend_from_slice(chunk);
        for _ in 0..10_000 {
            match codec.decode(&mut buf) {
                Ok(Some(Frame::Message(m))) => assert!(!m.contains(&0x0b) && !m.contains(&0x1c)),
                Ok(Some(Frame::Skipped(n))) => assert!(n > 0),
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
