//! The payload decode stream: bytes a hostile server sends as
//! `usr.img.zst`, through update-engine's real pipeline (download thread,
//! sha256 + zstd decode, writer thread, slot byte mapping) into an
//! in-memory slot. The first two input bytes pick the size the manifest
//! claims for the raw payload; the rest is the compressed body. Whatever
//! arrives must end in a clean error or a verified write, never a panic,
//! a hang or a write outside the slot.
#![no_main]

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nimbus_updater::apply::{run, Job};
use nimbus_updater::fetch::Http;
use nimbus_updater::target::{SlotDevice, SlotIo};
use nimbus_updater::writer::{Limits, Stream};

const SLOT: u64 = 256 * 1024;

/// A slot in memory that refuses writes outside itself.
struct Mem(Mutex<Vec<u8>>);
impl SlotIo for Mem {
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let end = off as usize + buf.len();
        assert!(end <= m.len(), "write outside the slot: {off}+{}", buf.len());
        m[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let end = off as usize + buf.len();
        assert!(end <= m.len(), "read outside the slot");
        buf.copy_from_slice(&m[off as usize..end]);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], body)) = data.split_first_chunk::<2>() else { return };
    // 0 to 316 KiB in 4 KiB steps: below, inside and above the slot.
    let raw_size = u64::from(u16::from_le_bytes([a, b]) % 80) * 4096;
    let dir = std::env::temp_dir().join(format!("nimbus-fuzz-payload-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("usr.img.zst");
    if std::fs::write(&file, body).is_err() {
        return;
    }
    let release = nimbus::release::Release {
        version: "1.1.0".parse().expect("version"),
        payload: "payloads/1.1.0/usr.img.zst".into(),
        compressed_size: body.len() as u64,
        compressed_sha256: "0".repeat(64),
        raw_size,
        raw_sha256: "0".repeat(64),
        verity_root: "0".repeat(64),
        rollout: None,
        stage1: None,
        delta: None,
    };
    let slot = SlotDevice::with_io(
        Box::new(Mem(Mutex::new(vec![0u8; SLOT as usize]))),
        std::path::Path::new("mem"),
        4,
        0,
        SLOT,
    );
    let Ok(http) = Http::new(Duration::from_secs(1), Duration::from_secs(1), Duration::from_secs(1)) else {
        return;
    };
    let cancel = AtomicBool::new(false);
    let progress = |_p: nimbus_updater::status::Progress| {};
    let checkpoint = |_c: &nimbus_updater::state::Checkpoint| -> Result<(), nimbus_updater::error::UpdateError> { Ok(()) };
    let job = Job {
        stream: Stream {
            http: &http,
            release: &release,
            slot: &slot,
            limits: Limits::default(),
            cancel: &cancel,
            progress: &progress,
        },
        url: "file".into(),
        file: Some(&file),
        resume: None,
        checkpoint: &checkpoint,
    };
    // The hashes in the release are zeros: success is impossible, so any
    // Ok would be a verification bypass.
    assert!(run(&job).is_err(), "a payload with all-zero hashes was accepted");
});
