//! Binary frames of the `messages:stream` WebSocket, decoded from arbitrary bytes.
//! Never panics; a refused frame gets a client error (4xx), and a decoded frame's body
//! is the frame's tail.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match carebus_http::decode_binary_stream_frame(bytes::Bytes::copy_from_slice(data)) {
        Ok((id, m)) => {
            assert_eq!(data.get(1..9).map(|b| b.to_vec()), Some(id.to_be_bytes().to_vec()));
            assert!(data.ends_with(&m.body));
        }
        Err((_, e)) => assert!(e.status.is_client_error(), "{}", e.code),
    }
});
