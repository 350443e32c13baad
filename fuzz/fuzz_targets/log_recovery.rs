//! Log recovery on an arbitrary active segment (a valid header followed by arbitrary
//! bytes) and, when the first input byte is odd, an arbitrary synced mark (the next 24
//! bytes): opening never panics; when it opens, whatever it keeps reads back without
//! error and is still there after a second open. With the log's own mark (which covers
//! the acknowledged batches) it always opens and keeps them.
#![no_main]

use carebus_log::{Log, LogConfig, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let cfg = LogConfig {
        segment_bytes: 1 << 20,
        ..LogConfig::default()
    };
    // A real segment with two batches, then the fuzz bytes as its tail.
    {
        let Ok((log, _)) = Log::open(dir.path(), cfg.clone()) else {
            return;
        };
        let _ = log.append_blocking(&[Record::new("a"), Record::new("b")]);
        let _ = log.append_blocking(&[Record::new("c")]);
    }
    let (own_mark, tail) = match data.split_first() {
        Some((&b, rest)) if b & 1 == 1 && rest.len() >= 24 => {
            let (mark, tail) = rest.split_at(24);
            if std::fs::write(dir.path().join("synced.mark"), mark).is_err() {
                return;
            }
            (false, tail)
        }
        _ => (true, data),
    };
    let seg = dir.path().join("00000000000000000000.log");
    let Ok(mut bytes) = std::fs::read(&seg) else {
        return;
    };
    bytes.extend_from_slice(tail);
    if std::fs::write(&seg, &bytes).is_err() {
        return;
    }
    let opened = Log::open(dir.path(), cfg.clone());
    assert!(
        opened.is_ok() || !own_mark,
        "refused a log whose damage lies past its own synced mark"
    );
    let Ok((log, _)) = opened else {
        return;
    };
    let n = log.next_offset();
    assert!(n >= 3, "acknowledged records lost");
    let all = log
        .read(0, usize::MAX, usize::MAX)
        .expect("kept data must read back");
    assert_eq!(all.len() as u64, n);
    drop(log);
    let (log, report) = Log::open(dir.path(), cfg).expect("second open");
    assert_eq!(log.next_offset(), n);
    assert_eq!(report.truncated_bytes, 0);
});
