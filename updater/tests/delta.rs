//! Delta updates in host mode, against a real HTTP server on loopback:
//! the slot is rebuilt from the booted slot's blocks and Range requests for
//! the frames it lacks, byte for byte what the full payload gives; every
//! way the delta can go wrong falls back to the full payload and says why;
//! a killed delta resumes without fetching again what it wrote.

mod support;

use std::time::{Duration, Instant};

use nimbus::layout::Slot;
use support::httpd::{Fault, Logged};
use support::{filler, Built, Fixture};

const USR_MIB: u64 = 64;

/// 1.0.0 and 1.1.0 as a package upgrade makes them: most files equal, a
/// new file whose blocks shift the layout after it, one file changed.
fn related(w: &std::path::Path, usr_size: u64, key: &nimbus::keys::ReleaseKey) -> (Built, Built) {
    let trust = nimbus::trust::TrustDoc::initial([key.public()], 1);
    let base = vec![
        ("lib/a/app.bin".to_string(), filler(1, 6 << 20)),
        ("lib/c/lib.so".to_string(), filler(2, 6 << 20)),
        ("lib/d/tool".to_string(), filler(3, 2 << 20)),
    ];
    let mut next = base.clone();
    next.push(("lib/b/new.bin".to_string(), filler(4, 300 << 10)));
    next[2].1 = filler(5, 2 << 20);
    (
        support::build_files(w, "1.0.0", &base, usr_size, &[key], &trust),
        support::build_files(w, "1.1.0", &next, usr_size, &[key], &trust),
    )
}

fn pack_gets(f: &Fixture) -> Vec<Logged> {
    f.httpd
        .requests()
        .into_iter()
        .filter(|l| l.path.ends_with("usr.pack"))
        .collect()
}

fn full_gets(f: &Fixture) -> Vec<Logged> {
    f.httpd
        .requests()
        .into_iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .collect()
}

/// Run update-engine once; it must stage 1.1.0. Its status.
fn good_run(f: &Fixture) -> serde_json::Value {
    let (out, st) = f.once(&[]);
    assert!(
        out.status.success(),
        "update-engine: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = st.expect("status json");
    assert_eq!(st["new_version"], "1.1.0", "{st}");
    st
}

fn pristine_disk(f: &Fixture) -> Vec<u8> {
    std::fs::read(&f.disk).expect("disk")
}

#[test]
fn a_delta_rebuilds_the_slot_byte_for_byte_and_fetches_only_missing_frames() {
    let f = Fixture::with_versions(USR_MIB, related);
    let r = support::release(&f.manifest(), "1.1.0");
    let d = r.delta.clone().expect("release publishes delta files");
    let a_before = f.partition_sha(Slot::A);
    let pristine = pristine_disk(&f);

    let st = good_run(&f);
    let apply = &st["last_apply"];
    assert_eq!(apply["mode"], "delta", "{apply}");
    let rep = &apply["delta"];
    let pct = rep["percent_of_full"].as_f64().expect("pct");
    assert!(pct < 40.0, "a package-sized change fetched {pct} %: {rep}");
    assert!(rep["from_booted"].as_u64().unwrap_or(0) > 2000, "{rep}");
    assert_eq!(rep["booted_hashes"], "its verity tree");
    // Only Range requests for frames: never the full payload, never the
    // whole pack.
    assert!(full_gets(&f).is_empty(), "fetched the full payload");
    let gets = pack_gets(&f);
    assert!(!gets.is_empty());
    for g in &gets {
        assert_eq!(g.status, 206, "{g:?}");
        let (s, e) = (g.range_start.expect("range"), g.range_end.expect("bounded"));
        assert!(e - s + 1 < d.pack.size, "{g:?} asked for the whole pack");
    }
    let fetched: u64 = gets.iter().map(|g| g.body_bytes).sum();
    assert_eq!(Some(fetched), rep["fetched_bytes"].as_u64());
    assert_eq!(rep["requests"].as_u64(), Some(gets.len() as u64 + 1));

    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    f.veritysetup_verify(Slot::B, &r.verity_root);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
    assert_eq!(
        f.partition_sha(Slot::A),
        a_before,
        "the booted slot is untouched"
    );
    assert!(f.state()["delta_checkpoint"].is_null());
    let delta_slot = f.partition_sha(Slot::B);

    // The same update from the full payload (the server ignores Range, so
    // the delta gives way): the same slot, byte for byte.
    std::fs::write(&f.disk, &pristine).expect("reset disk");
    f.httpd.clear_log();
    f.httpd.set_fault(Fault {
        suffix: "usr.pack".into(),
        ignore_range: true,
        ..Fault::default()
    });
    let st = good_run(&f);
    let apply = &st["last_apply"];
    assert_eq!(apply["mode"], "full", "{apply}");
    let why = apply["delta_fallback"].as_str().unwrap_or("");
    assert!(why.contains("ignored the Range request"), "{why}");
    assert_eq!(full_gets(&f).len(), 1);
    assert_eq!(f.partition_sha(Slot::B), delta_slot);
}

#[test]
fn a_bad_pack_or_index_falls_back_to_the_full_payload_and_says_why() {
    let f = Fixture::with_versions(USR_MIB, related);
    let r = support::release(&f.manifest(), "1.1.0");
    let d = r.delta.clone().expect("delta");
    let pristine = pristine_disk(&f);
    let a_before = f.partition_sha(Slot::A);
    let pack = f.repo.join(&d.pack.path);
    let index = f.repo.join(&d.index.path);
    let pack_bytes = std::fs::read(&pack).expect("pack");
    let index_bytes = std::fs::read(&index).expect("index");

    let case = |name: &str, expect: &str, kind_of_fault: &dyn Fn()| {
        std::fs::write(&f.disk, &pristine).expect("reset disk");
        std::fs::write(&pack, &pack_bytes).expect("pack");
        std::fs::write(&index, &index_bytes).expect("index");
        f.httpd.set_fault(Fault::default());
        kind_of_fault();
        f.httpd.clear_log();
        let st = good_run(&f);
        let apply = &st["last_apply"];
        assert_eq!(apply["mode"], "full", "{name}: {apply}");
        let why = apply["delta_fallback"].as_str().unwrap_or("");
        assert!(
            why.contains(expect),
            "{name}: fallback reason {why:?}, expected {expect:?}"
        );
        assert_eq!(
            f.slot_payload_sha(Slot::B, r.raw_size),
            r.raw_sha256,
            "{name}"
        );
        assert_eq!(f.cgpt(Slot::B), (2, 1, 0), "{name}");
        assert_eq!(
            f.partition_sha(Slot::A),
            a_before,
            "{name}: booted slot touched"
        );
    };

    // Wrong bytes in every frame (a corrupt mirror): the first frame the
    // host needs fails to decode or does not match the index.
    case("frame with wrong bytes", "delta pack", &|| {
        let mut b = pack_bytes.clone();
        for i in (100..b.len()).step_by(7000) {
            b[i] ^= 0x55;
        }
        std::fs::write(&pack, &b).expect("pack");
    });
    // A truncated index: its size no longer matches the signed manifest.
    case("truncated index", "ended after", &|| {
        std::fs::write(&index, &index_bytes[..index_bytes.len() / 2]).expect("index");
    });
    // An index with the right size but altered: its hash does not match.
    case("altered index", "sha256", &|| {
        let mut b = index_bytes.clone();
        let n = b.len();
        b[n - 3] ^= 1;
        std::fs::write(&index, &b).expect("index");
    });
    // A server that answers a range with fewer bytes than asked.
    case("short Range answer", "asked for bytes", &|| {
        f.httpd.set_fault(Fault {
            suffix: "usr.pack".into(),
            range_short: Some(100),
            ..Fault::default()
        });
    });
    // The pack is missing on the server.
    case("missing pack", "missing", &|| {
        std::fs::remove_file(&pack).expect("rm pack");
    });
}

/// The booted slot is read from its partition, not through dm-verity (the
/// kernel's verity workers would hash it at nice -20, starving the host's
/// etcd): a booted block changed on disk must be caught by the delta's own
/// check, and the full payload take over, the new slot still verified.
#[test]
fn a_booted_slot_changed_on_disk_gives_way_to_the_full_payload() {
    let f = Fixture::with_versions(USR_MIB, related);
    let r = support::release(&f.manifest(), "1.1.0");
    let a = {
        let d = nimbus::gpt::Disk::open_path(&f.disk, false).expect("open");
        d.partition(Slot::A.partition_number()).expect("USR-A")
    };
    // One byte in every 16th block of USR-A's first 4 MiB (file data, well
    // before the tree and the descriptor): blocks the delta takes from the
    // booted slot by its (unchanged) tree.
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.disk)
            .expect("disk");
        for blk in (0..1024u64).step_by(16) {
            let at = a.offset_bytes() + blk * 4096 + 100;
            let mut b = [0u8; 1];
            disk.read_exact_at(&mut b, at).expect("read");
            disk.write_all_at(&[b[0] ^ 0x5a], at).expect("write");
        }
    }
    let a_changed = f.partition_sha(Slot::A);

    let st = good_run(&f);
    let apply = &st["last_apply"];
    assert_eq!(apply["mode"], "full", "{apply}");
    let why = apply["delta_fallback"].as_str().unwrap_or("");
    assert!(
        why.contains("of the booted slot does not match the index"),
        "{why}"
    );
    assert_eq!(full_gets(&f).len(), 1);
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    f.veritysetup_verify(Slot::B, &r.verity_root);
    assert_eq!(f.partition_sha(Slot::A), a_changed, "USR-A was written to");
}

#[test]
fn a_delta_larger_than_most_of_the_payload_is_not_used() {
    // Unrelated versions: nearly every block would be fetched.
    let f = Fixture::new(12, USR_MIB);
    let st = good_run(&f);
    let apply = &st["last_apply"];
    assert_eq!(apply["mode"], "full", "{apply}");
    let why = apply["delta_fallback"].as_str().unwrap_or("");
    assert!(why.contains("of the full payload"), "{why}");
    assert!(
        pack_gets(&f).is_empty(),
        "no frame was fetched before deciding"
    );
}

#[test]
fn a_killed_delta_resumes_without_fetching_what_it_wrote() {
    // Half of the data new, so there are many frames to fetch; the pack is
    // served slowly so a checkpoint lands before the end.
    let f = Fixture::with_versions(USR_MIB, |w, usr_size, key| {
        let trust = nimbus::trust::TrustDoc::initial([key.public()], 1);
        let old = vec![
            ("lib/a.bin".to_string(), filler(1, 10 << 20)),
            ("lib/z.bin".to_string(), filler(2, 8 << 20)),
        ];
        let new = vec![
            ("lib/a.bin".to_string(), filler(1, 10 << 20)),
            ("lib/z.bin".to_string(), filler(9, 8 << 20)),
        ];
        (
            support::build_files(w, "1.0.0", &old, usr_size, &[key], &trust),
            support::build_files(w, "1.1.0", &new, usr_size, &[key], &trust),
        )
    });
    let r = support::release(&f.manifest(), "1.1.0");
    let d = r.delta.clone().expect("delta");
    let index =
        nimbus::delta::Index::parse(&std::fs::read(f.repo.join(&d.index.path)).expect("index"))
            .expect("parse");
    f.httpd.set_fault(Fault {
        suffix: "usr.pack".into(),
        throttle: Some(600 << 10),
        ..Fault::default()
    });
    let mut child = f
        .engine(&["--once"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let written = loop {
        let st = f.state();
        if let Some(b) = st["delta_checkpoint"]["blocks"].as_u64() {
            break b;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no delta checkpoint appeared"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "update-engine ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(written > 0 && written < index.data_blocks());

    f.httpd.set_fault(Fault::default());
    f.httpd.clear_log();
    let st = good_run(&f);
    let rep = &st["last_apply"]["delta"];
    assert_eq!(st["last_apply"]["mode"], "delta", "{st}");
    assert!(rep["from_passive"].as_u64().unwrap_or(0) > 0, "{rep}");
    // Nothing below the checkpoint is fetched again: every range starts
    // at or after the first frame that was not whole on disk.
    let first_unwritten = index.frame_bytes(nimbus::delta::Index::frame_of(written)).0;
    for g in pack_gets(&f) {
        assert!(
            g.range_start.unwrap_or(0) >= first_unwritten,
            "{g:?} fetched again below the checkpoint (block {written}, pack byte {first_unwritten})"
        );
    }
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    f.veritysetup_verify(Slot::B, &r.verity_root);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
}
