//! The JSON bodies the HTTP API accepts, decoded from arbitrary bytes into the broker's
//! configuration types and validated: never panics.
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
});
