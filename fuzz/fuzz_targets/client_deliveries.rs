//! The Rust client's reader of binary receive answers, fed arbitrary bytes (a broken
//! or hostile server). Never panics, and never allocates by a count it was merely told:
//! every delivery it returns was really in the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ds) = carebus_client::decode_binary_deliveries(data) {
        let bodies: usize = ds.iter().map(|d| d.body.len()).sum();
        assert!(bodies <= data.len());
        assert!(ds.len() * 41 <= data.len());
    }
});
