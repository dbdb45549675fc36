//! SIGKILL update-engine mid-download, start it again: it resumes with an
//! HTTP Range request from its last checkpoint (after re-hashing the slot
//! prefix) and finishes with the right hashes.

mod support;

use std::time::{Duration, Instant};

use nimbus::layout::Slot;
use support::httpd::Fault;
use support::Fixture;

/// A fixture whose payload spans three zstd frames, an update-engine
/// started against a throttled server and SIGKILLed as soon as it saved a
/// checkpoint. Returns the fixture, the release and the checkpoint.
fn killed_after_checkpoint() -> (Fixture, nimbus::release::Release, serde_json::Value) {
    // 96 MiB raw = three 32 MiB zstd frames, so there are frame boundaries
    // to checkpoint at.
    let f = Fixture::new(96, 160);
    // The full payload's own resume: a manifest without delta files, as an
    // older publisher writes (with them, a resume may go by delta instead:
    // updater/tests/delta.rs).
    f.resign(&f.key, |m| {
        m.releases.iter_mut().for_each(|r| r.delta = None)
    });
    let r = support::release(&f.manifest(), "1.1.0");
    // Slow enough that a checkpoint (first frame end after 2 s) lands well
    // before the end.
    let bps = (r.compressed_size / 7).max(1);
    f.httpd.set_fault(Fault {
        suffix: "usr.img.zst".into(),
        throttle: Some(bps),
        ..Fault::default()
    });
    let mut child = f
        .engine(&["--once"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let cp = loop {
        let st = f.state();
        if !st["checkpoint"].is_null() {
            break st["checkpoint"].clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "update-engine ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    (f, r, cp)
}

/// Run update-engine once; it must succeed. The payload requests it made.
fn payload_gets_of_a_good_run(f: &Fixture) -> Vec<support::httpd::Logged> {
    let (out, _) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.httpd
        .requests()
        .into_iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .collect()
}

#[test]
fn killed_mid_download_resumes_with_range() {
    let (f, r, cp) = killed_after_checkpoint();
    let comp_off = cp["comp_offset"].as_u64().expect("comp_offset");
    assert!(comp_off > 0 && comp_off < r.compressed_size, "{cp}");
    assert_eq!(f.cgpt(Slot::B).0, 0, "a half-written slot is not bootable");

    f.httpd.set_fault(Fault::default());
    f.httpd.clear_log();
    let (out, st) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(st.expect("status")["state"], "UPDATED_NEED_REBOOT");
    let gets: Vec<_> = f
        .httpd
        .requests()
        .into_iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range_start,
        Some(comp_off),
        "resumed at the checkpoint"
    );
    assert_eq!(gets[0].status, 206);
    assert!(
        gets[0].body_bytes < r.compressed_size,
        "downloaded less than the whole payload again"
    );
    assert_eq!(gets[0].body_bytes, r.compressed_size - comp_off);
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
    assert!(
        f.state()["checkpoint"].is_null(),
        "checkpoint cleared after success"
    );
}

#[test]
fn a_checkpoint_that_does_not_match_the_slot_is_not_trusted() {
    let (f, r, cp) = killed_after_checkpoint();
    // Damage the slot inside the checkpointed prefix.
    let d = nimbus::gpt::Disk::open_path(&f.disk, true).expect("open");
    let p = d.partition(4).expect("usr-b");
    use std::os::unix::fs::FileExt;
    d.into_device()
        .write_all_at(b"garbage", p.offset_bytes() + 4096)
        .expect("write");
    assert!(cp["raw_offset"].as_u64().unwrap_or(0) > 8192);

    f.httpd.set_fault(Fault::default());
    f.httpd.clear_log();
    let gets = payload_gets_of_a_good_run(&f);
    assert_eq!(gets.len(), 1);
    assert_eq!(
        gets[0].range_start, None,
        "started over instead of resuming onto a damaged prefix"
    );
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
}

#[test]
fn a_server_that_ignores_range_gets_a_full_download() {
    let (f, r, _) = killed_after_checkpoint();
    f.httpd.set_fault(Fault {
        suffix: "usr.img.zst".into(),
        ignore_range: true,
        ..Fault::default()
    });
    f.httpd.clear_log();
    let gets = payload_gets_of_a_good_run(&f);
    assert_eq!(gets.len(), 1);
    assert!(gets[0].range_start.is_some(), "it asked for a range");
    assert_eq!(gets[0].status, 200);
    assert_eq!(gets[0].body_bytes, r.compressed_size);
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
}

/// A checkpoint made from bytes that are not the payload's (a stale mirror
/// or a brief man in the middle served them): the slot prefix agrees with
/// the checkpoint, so resuming looks fine, and the finished slot fails its
/// hash. That attempt drops the checkpoint; the next one starts over and
/// succeeds, instead of failing the same way until a new release.
#[test]
fn a_poisoned_checkpoint_is_dropped_after_the_attempt_it_spoils() {
    let (f, r, mut cp) = killed_after_checkpoint();
    // Rewrite the checkpointed prefix with other bytes and make the
    // checkpoint agree with them, as if they had been served.
    let raw_off = cp["raw_offset"].as_u64().expect("raw_offset");
    let d = nimbus::gpt::Disk::open_path(&f.disk, true).expect("open");
    let p = d.partition(4).expect("usr-b");
    let dev = d.into_device();
    use std::os::unix::fs::FileExt;
    let stale = vec![0x5au8; 1 << 20];
    let mut h = nimbus_updater::sha::Sha256::new();
    let mut off = 0;
    while off < raw_off {
        let n = (raw_off - off).min(stale.len() as u64) as usize;
        dev.write_all_at(&stale[..n], p.offset_bytes() + off)
            .expect("write");
        h.update(&stale[..n]);
        off += n as u64;
    }
    dev.sync_all().expect("sync");
    // Our writable open holds the disk's lock: let go before the engine runs.
    drop(dev);
    cp["raw_state"] = serde_json::to_value(h.save()).expect("state");
    let mut st = f.state();
    st["checkpoint"] = cp;
    std::fs::write(
        f.root.join("var/lib/nimbus/update-engine.json"),
        serde_json::to_vec(&st).expect("json"),
    )
    .expect("write state");

    f.httpd.set_fault(Fault::default());
    f.httpd.clear_log();
    let (out, _) = f.once(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the spoiled attempt cannot succeed");
    assert!(err.contains("sha256"), "{err}");
    assert!(
        f.state()["checkpoint"].is_null(),
        "the poisoned checkpoint was kept: {}",
        f.state()["checkpoint"]
    );
    assert_eq!(f.cgpt(Slot::B).0, 0, "a failed slot is not bootable");

    f.httpd.clear_log();
    let gets = payload_gets_of_a_good_run(&f);
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].range_start, None, "started over");
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
}
