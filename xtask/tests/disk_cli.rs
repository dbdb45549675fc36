//! `cargo xtask disk` against the real `cgpt` and `sgdisk` (Debian packages
//! cgpt and gdisk, installed by .ci/run). A missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nimbus::keys::ReleaseKey;
use nimbus::release::SlotDescriptor;

const USR_TYPE: &str = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6";

/// Every command here works on a small image file: seconds at most.
fn run(cmd: &str, args: &[&str]) -> Output {
    nimbus_testkit::proc::output(
        Command::new(cmd).args(args),
        std::time::Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e} (install it: cargo xtask deps)"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn xtask(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_xtask"), args)
}

fn xtask_ok(args: &[&str]) -> String {
    ok(env!("CARGO_BIN_EXE_xtask"), args)
}

struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Img {
    fn new() -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        // Small USR slots keep the sparse file small; the layout is the same.
        xtask_ok(&["disk", "new", s(&path), "--size", "1G", "--usr-size", "64M"]);
        Img { _dir: dir, path }
    }
    fn p(&self) -> &str {
        s(&self.path)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// cgpt's view of one partition: priority/tries/successful.
fn cgpt_pts(img: &Img, part: u32) -> (u8, u8, u8) {
    let i = part.to_string();
    let get = |flag: &str| {
        ok("cgpt", &["show", "-i", &i, flag, img.p()])
            .trim()
            .parse()
            .unwrap()
    };
    (get("-P"), get("-T"), get("-S"))
}

/// sgdisk -v prints "No problems found" even when it had to fall back to the
/// backup table; the damage is reported on stderr. Clean means both.
fn sgdisk_verify(img: &Img) -> String {
    let o = run("sgdisk", &["-v", img.p()]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sgdisk_clean(img: &Img) {
    let out = sgdisk_verify(img);
    assert!(out.contains("No problems found"), "sgdisk -v: {out}");
    for bad in ["Caution", "Warning", "ERROR", "corrupt"] {
        assert!(!out.contains(bad), "sgdisk -v: {out}");
    }
}

fn partition_numbers(img: &Img) -> Vec<u32> {
    ok("sgdisk", &["-p", img.p()])
        .lines()
        .skip_while(|l| !l.starts_with("Number"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn show_json(img: &Img, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["disk", "show", img.p(), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&xtask_ok(&args)).unwrap()
}

fn slot_json(v: &serde_json::Value, part: u64) -> serde_json::Value {
    v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["number"] == part)
        .unwrap()
        .clone()
}

#[test]
fn fresh_disk_is_valid_and_cgpt_reads_our_attributes() {
    let img = Img::new();
    sgdisk_clean(&img);
    assert_eq!(partition_numbers(&img), [1, 2, 3, 4, 6, 9]);
    assert_eq!(cgpt_pts(&img, 3), (1, 0, 1));
    assert_eq!(cgpt_pts(&img, 4), (0, 0, 0));
    let found = ok("cgpt", &["find", "-t", USR_TYPE, img.p()]);
    let found: Vec<&str> = found.lines().collect();
    assert_eq!(found, [format!("{}3", img.p()), format!("{}4", img.p())]);
    // Labels and types as sgdisk sees them.
    let info = ok("sgdisk", &["-i", "9", img.p()]);
    assert!(
        info.contains("3884DD41-8582-4404-B9A8-E9B84F2DF50E"),
        "{info}"
    );
    assert!(info.contains("'ROOT'"), "{info}");
}

#[test]
fn update_flow_interop_with_cgpt() {
    let img = Img::new();
    xtask_ok(&["disk", "prioritize", img.p(), "--slot", "B"]);
    assert_eq!(cgpt_pts(&img, 4), (2, 1, 0));
    assert_eq!(cgpt_pts(&img, 3), (1, 0, 1));
    sgdisk_clean(&img);
    assert_eq!(partition_numbers(&img), [1, 2, 3, 4, 6, 9]);

    // The new slot's one try is spent by a boot that failed: back to A.
    ok("cgpt", &["add", "-i", "4", "-T", "0", img.p()]);
    assert_eq!(xtask_ok(&["disk", "select", img.p()]).trim(), "USR-A");
    assert_eq!(
        cgpt_pts(&img, 3),
        (1, 0, 1),
        "a successful slot pays no try"
    );
    sgdisk_clean(&img);

    // A good boot of B: select spends its try (persisted), mark-good proves it.
    xtask_ok(&["disk", "prioritize", img.p(), "--slot", "B"]);
    assert_eq!(xtask_ok(&["disk", "select", img.p()]).trim(), "USR-B");
    assert_eq!(cgpt_pts(&img, 4), (2, 0, 0));
    xtask_ok(&["disk", "mark-good", img.p(), "--slot", "B"]);
    assert_eq!(cgpt_pts(&img, 4), (2, 0, 1));
    assert_eq!(xtask_ok(&["disk", "select", img.p()]).trim(), "USR-B");

    // Invalidate both: nothing to boot, exit 1 with a message.
    xtask_ok(&["disk", "invalidate", img.p(), "--slot", "A"]);
    xtask_ok(&["disk", "invalidate", img.p(), "--slot", "B"]);
    assert_eq!(cgpt_pts(&img, 3), (0, 0, 0));
    let o = xtask(&["disk", "select", img.p()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no bootable USR slot"));
    sgdisk_clean(&img);
    assert_eq!(partition_numbers(&img), [1, 2, 3, 4, 6, 9]);
}

#[test]
fn values_written_by_cgpt_read_back_exactly() {
    let img = Img::new();
    for (p, t, ok_) in [(15u8, 15u8, 1u8), (0, 7, 0), (9, 0, 1), (3, 1, 0)] {
        ok(
            "cgpt",
            &[
                "add",
                "-i",
                "4",
                "-P",
                &p.to_string(),
                "-T",
                &t.to_string(),
                "-S",
                &ok_.to_string(),
                img.p(),
            ],
        );
        let v = slot_json(&show_json(&img, &[]), 4);
        assert_eq!(v["priority"], p);
        assert_eq!(v["tries"], t);
        assert_eq!(v["successful"], ok_ == 1);
    }
}

#[test]
fn foreign_attribute_bits_survive_our_writes() {
    let img = Img::new();
    // Bit 63 (top of cgpt's 16-bit -A view) belongs to someone else.
    ok("cgpt", &["add", "-i", "4", "-A", "0x8000", img.p()]);
    xtask_ok(&["disk", "prioritize", img.p(), "--slot", "B"]);
    xtask_ok(&["disk", "mark-good", img.p(), "--slot", "B"]);
    let a = ok("cgpt", &["show", "-i", "4", "-A", img.p()]);
    assert_eq!(
        a.trim(),
        "0x8102",
        "successful=1 tries=0 priority=2 and bit 63 kept"
    );
}

#[test]
fn torn_primary_header_uses_backup_and_repairs() {
    let img = Img::new();
    xtask_ok(&["disk", "prioritize", img.p(), "--slot", "B"]);
    // Zero the primary header (LBA 1).
    ok(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", img.p()),
            "bs=512",
            "seek=1",
            "count=1",
            "conv=notrunc",
        ],
    );
    assert!(sgdisk_verify(&img).contains("Main header: ERROR"));
    let v = show_json(&img, &[]);
    assert!(v["health"]["primary_error"].is_string(), "{v}");
    assert_eq!(
        slot_json(&v, 4)["priority"],
        2,
        "backup copy holds the last state"
    );
    let text = xtask_ok(&["disk", "show", img.p()]);
    assert!(text.contains("primary GPT damaged"), "{text}");
    xtask_ok(&["disk", "repair", img.p()]);
    sgdisk_clean(&img);
    assert_eq!(cgpt_pts(&img, 4), (2, 1, 0));
    assert_eq!(partition_numbers(&img), [1, 2, 3, 4, 6, 9]);
}

#[test]
fn bad_crc_in_primary_is_repaired_by_the_next_write() {
    let img = Img::new();
    // Flip one byte inside the primary entry array (entry 3's name).
    let mut bytes = std::fs::read(&img.path).unwrap();
    bytes[1024 + 2 * 128 + 60] ^= 0x20;
    std::fs::write(&img.path, &bytes).unwrap();
    let o = xtask(&["disk", "prioritize", img.p(), "--slot", "B"]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("CRC"),
        "warned about the damage"
    );
    sgdisk_clean(&img);
    assert_eq!(cgpt_pts(&img, 4), (2, 1, 0));
}

#[test]
fn both_copies_destroyed_is_a_clear_error() {
    let img = Img::new();
    let len = std::fs::metadata(&img.path).unwrap().len();
    for seek in [1, len / 512 - 1] {
        ok(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={}", img.p()),
                "bs=512",
                &format!("seek={seek}"),
                "count=1",
                "conv=notrunc",
            ],
        );
    }
    let o = xtask(&["disk", "select", img.p()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(img.p()) && err.contains("no valid GPT"),
        "{err}"
    );
}

#[test]
fn foreign_disk_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.img");
    ok("truncate", &["-s", "200M", s(&path)]);
    ok(
        "sgdisk",
        &[
            "-n",
            "1:2048:+50M",
            "-t",
            &format!("1:{USR_TYPE}"),
            "-n",
            "3:0:+50M",
            "-t",
            "3:8300",
            s(&path),
        ],
    );
    let before = std::fs::read(&path).unwrap();
    for args in [
        vec!["disk", "prioritize", s(&path), "--slot", "A"],
        vec!["disk", "select", s(&path)],
        vec!["disk", "mark-good", s(&path), "--slot", "A"],
        vec!["disk", "invalidate", s(&path), "--slot", "B"],
        vec!["disk", "repair", s(&path)],
    ] {
        let o = xtask(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("not a Nimbus disk"),
            "{args:?}"
        );
    }
    assert!(
        std::fs::read(&path).unwrap() == before,
        "foreign disk was modified"
    );
}

#[test]
fn new_refuses_bad_sizes_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let o = xtask(&["disk", "new", s(&path), "--size", "500M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("too small"));
    assert!(!path.exists(), "nothing left behind");
    let o = xtask(&["disk", "new", s(&path), "--size", "lots"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "bad CLI argument is a usage error"
    );
    xtask_ok(&["disk", "new", s(&path), "--size", "1G", "--usr-size", "64M"]);
    let o = xtask(&["disk", "new", s(&path), "--size", "1G", "--usr-size", "64M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}

#[test]
fn seeded_disks_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for p in [&a, &b] {
        xtask_ok(&[
            "disk",
            "new",
            s(p),
            "--size",
            "1G",
            "--usr-size",
            "64M",
            "--seed",
            "1.2.0",
        ]);
    }
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

#[test]
fn show_reports_descriptor_and_signature() {
    let img = Img::new();
    let keydir = tempfile::tempdir().unwrap();
    xtask_ok(&["keygen", "--out", s(keydir.path())]);
    let key = ReleaseKey::load_dir(keydir.path()).unwrap();
    let d = SlotDescriptor {
        version: "1.2.0".parse().unwrap(),
        data_size: 1024 * 4096,
        hash_offset: 1024 * 4096,
        hash_size: 9 * 4096,
        verity_root: [0xab; 32],
        verity_salt: [0xcd; 32],
        created: 0,
        signers: vec![],
    };
    let bytes = d.sign(&[&key]).unwrap();
    // USR-A ends where USR-B starts: LBA of partition 4 minus one.
    let v = show_json(&img, &[]);
    let end = (slot_json(&v, 3)["last_lba"].as_u64().unwrap() + 1) * 512;
    let mut img_bytes = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap();
    use std::io::{Seek, SeekFrom, Write};
    img_bytes.seek(SeekFrom::Start(end - 4096)).unwrap();
    img_bytes.write_all(&bytes).unwrap();
    drop(img_bytes);

    let v = slot_json(&show_json(&img, &["--keys", s(keydir.path())]), 3);
    let desc = &v["descriptor"];
    assert_eq!(desc["version"], "1.2.0");
    assert_eq!(desc["data_size"], 1024 * 4096);
    assert_eq!(desc["hash_offset"], 1024 * 4096);
    assert_eq!(desc["verity_root"], "ab".repeat(32));
    assert_eq!(desc["verity_salt"], "cd".repeat(32));
    assert_eq!(desc["signature_valid"], true);

    // Another key: the same descriptor no longer verifies.
    let other = tempfile::tempdir().unwrap();
    xtask_ok(&["keygen", "--out", s(other.path())]);
    let v = slot_json(&show_json(&img, &["--keys", s(other.path())]), 3);
    assert_eq!(v["descriptor"]["signature_valid"], false);
    assert!(v["descriptor"]["signature_error"]
        .as_str()
        .unwrap()
        .contains("not trusted"));
    // No descriptor on the empty slot.
    assert!(slot_json(&show_json(&img, &[]), 4)
        .get("descriptor")
        .is_none());
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    xtask_ok(&["keygen", "--out", s(dir.path())]);
    let o = xtask(&["keygen", "--out", s(dir.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("release.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
