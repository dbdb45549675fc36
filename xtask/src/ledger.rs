//! What a test run cost, for `cargo xtask vmtest`'s table: every guest boot
//! and every image build (or image-cache hit) appends one line to the file
//! named by `NIMBUS_LEDGER`, which vmtest sets for each test it runs. The
//! variable is inherited by the xtask commands a test starts, so the counts
//! cross process boundaries without any other channel.

use std::io::Write;

/// The environment variable naming the ledger file.
pub const ENV: &str = "NIMBUS_LEDGER";

/// Append `kind t=UNIX-SECONDS detail` (kinds: `boot`, `build`,
/// `cache-hit`). Without the
/// variable this does nothing; a ledger that cannot be written only loses
/// a count, never fails the work it counts.
pub fn record(kind: &str, detail: &str) {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // One write per line: appends of lines this short do not interleave.
        let _ = f.write_all(format!("{kind} t={t} {detail}\n").as_bytes());
    }
}

/// Counts of each kind in a ledger's text.
pub fn count(text: &str, kind: &str) -> usize {
    text.lines()
        .filter(|l| l.split_whitespace().next() == Some(kind))
        .count()
}
