//! The JSON the HTTP API accepts, decoded from arbitrary bytes: bodies into the broker's
//! configuration types (validated), and frames of the `messages:stream` WebSocket into
//! messages to publish. Never panics; a decoded frame keeps its id.
#![no_main]

use carebus_core::{SubscriptionConfig, TopicConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<TopicConfig>(data) {
        let _ = c.validate();
        let _ = c.dedup_window();
    }
    if let Ok(c) = serde_json::from_slice::<SubscriptionConfig>(data) {
        if c.validate().is_ok() {
            for attempt in [0u32, 1, 5, u32::MAX] {
                let _ = c.backoff.delay_ms(attempt, 0.5);
            }
        }
    }
    let _ = serde_json::from_slice::<serde_json::Value>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        match carebus_http::decode_stream_frame(text) {
            Ok((id, m)) => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                assert_eq!(v.get("id").and_then(serde_json::Value::as_u64), Some(id));
                let _ = m.body_hash();
            }
            Err((_, e)) => assert!(e.status.is_client_error(), "{}", e.code),
        }
    }
});
