//! Test fixtures: small Nimbus disks with a real erofs + verity USR-A,
//! payloads of later versions, a release repository made by the same code
//! as `cargo xtask release`, and a loopback HTTP server serving it.

#![allow(dead_code)]

#[allow(unused_imports)]
pub use nimbus_testkit::etcd;
#[allow(unused_imports)]
pub use nimbus_testkit::httpd;

use nimbus_testkit::host;

pub mod reboot;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nimbus::gpt::Disk;
use nimbus::keys::ReleaseKey;
use nimbus::layout::{Slot, MIB};
use nimbus_image::usr::{self, Compression, UsrInputs};
use semver::Version;
use sha2::Digest;

pub const ENGINE: &str = env!("CARGO_BIN_EXE_update-engine");
pub const UPDATECTL: &str = env!("CARGO_BIN_EXE_updatectl");

/// `updatectl ARGS`: its output, and stdout + stderr as one text for
/// assertions and failure messages.
pub fn updatectl(args: &[&std::ffi::OsStr]) -> (Output, String) {
    let out = Command::new(UPDATECTL)
        .args(args)
        .output()
        .expect("updatectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Deterministic, compressible (about 3:1) bytes: words from a small
/// vocabulary picked by xorshift, like text and code in a real /usr.
pub fn filler(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"the ",
        b"kernel ",
        b"update ",
        b"slot ",
        b"verity ",
        b"0x1f ",
        b"{\n",
        b"}\n",
        b"return ",
        b"etcd ",
        b"container ",
        b"\x00\x00\x00\x00",
        b"\x7fELF",
        b"fn ",
        b"let ",
        b"mut ",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(5) {
            out.extend_from_slice(&x.to_le_bytes()[..3]);
        } else {
            out.extend_from_slice(WORDS[(x >> 32) as usize % WORDS.len()]);
        }
    }
    out.truncate(len);
    out
}

pub struct Built {
    pub slot: usr::UsrSlot,
    pub dir: PathBuf,
}

/// A USR filesystem for `version` with `data_mib` of payload data, and
/// (in `dir`) `usr.img.zst` + `build.json` as `cargo xtask build-image`
/// leaves them.
pub fn build_version(
    work: &Path,
    version: &str,
    data_mib: usize,
    slot_size: u64,
    key: &ReleaseKey,
) -> Built {
    let trust = nimbus::trust::TrustDoc::initial([key.public()], 1);
    build_signed(work, version, data_mib, slot_size, &[key], &trust)
}

/// As `build_version`, signed by `keys`, carrying the trust set `trust`.
pub fn build_signed(
    work: &Path,
    version: &str,
    data_mib: usize,
    slot_size: u64,
    keys: &[&ReleaseKey],
    trust: &nimbus::trust::TrustDoc,
) -> Built {
    let v: Version = version.parse().expect("version");
    let files = vec![(
        "lib/data.bin".to_string(),
        filler(v.minor * 1000 + v.patch + 7, data_mib << 20),
    )];
    build_files(work, version, &files, slot_size, keys, trust)
}

/// A USR for `version` holding `files` (path under /usr, content) and
/// `lib/os-release`, signed by `keys`, carrying the trust set `trust`.
pub fn build_files(
    work: &Path,
    version: &str,
    files: &[(String, Vec<u8>)],
    slot_size: u64,
    keys: &[&ReleaseKey],
    trust: &nimbus::trust::TrustDoc,
) -> Built {
    let v: Version = version.parse().expect("version");
    let dir = work.join("build").join(version);
    let tree = dir.join("usr-tree");
    std::fs::create_dir_all(tree.join("lib")).expect("mkdir");
    std::fs::write(
        tree.join("lib/os-release"),
        format!("ID=nimbus\nVERSION_ID={version}\n"),
    )
    .expect("write");
    for (path, data) in files {
        let p = tree.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }
    let fs = dir.join("usr.erofs");
    let slot = usr::build(&UsrInputs {
        usr_dir: &tree,
        out_fs: &fs,
        version: &v,
        compression: Compression::None,
        epoch: 1_700_000_000,
        fs_uuid: uuid::Uuid::from_u128(0x1234_0000 + u128::from(v.minor)),
        slot_size,
        keys,
    })
    .expect("build usr");
    let info = slot
        .write_payload(&dir.join("usr.img.zst"), 3)
        .expect("payload");
    let bj = serde_json::json!({
        "version": version,
        "verity_root": hex::encode(slot.fields.verity_root),
        "payload": info,
    });
    std::fs::write(
        dir.join("build.json"),
        serde_json::to_vec(&bj).expect("json"),
    )
    .expect("write");
    std::fs::write(dir.join("trust.json"), trust.to_bytes()).expect("write");
    Built { slot, dir }
}

/// A sparse Nimbus disk with `slot` in USR-A (1/0/1) and USR-B empty (0/0/0).
pub fn make_disk(path: &Path, usr_size: u64, slot: &usr::UsrSlot) {
    host::disk(
        path,
        usr_size,
        42,
        host::SlotInit::good(1, Some(slot)),
        host::SlotInit::EMPTY,
    )
    .unwrap_or_else(|e| panic!("host disk {}: {e}", path.display()));
}

pub fn publish(
    repo: &Path,
    from: &Path,
    channel: &str,
    key: &ReleaseKey,
    expires_secs: u64,
) -> nimbus::release::Manifest {
    let keys = [key];
    nimbus_image::release::publish(&nimbus_image::release::PublishOptions {
        expires_secs,
        ..nimbus_image::release::PublishOptions::simple(from, repo, channel, &keys)
    })
    .expect("publish")
}

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub key: ReleaseKey,
    pub disk: PathBuf,
    pub root: PathBuf,
    pub repo: PathBuf,
    pub httpd: httpd::Httpd,
    pub usr_size: u64,
    pub next: Built,
}

impl Fixture {
    /// Disk at 1.0.0; 1.1.0 built and published on `stable`.
    pub fn new(data_mib: usize, usr_mib: u64) -> Fixture {
        Fixture::with_versions(usr_mib, |w, usr_size, key| {
            (
                build_version(w, "1.0.0", data_mib, usr_size, key),
                build_version(w, "1.1.0", data_mib, usr_size, key),
            )
        })
    }

    /// Disk at the first version `build` makes; the second published on
    /// `stable`.
    pub fn with_versions(
        usr_mib: u64,
        build: impl FnOnce(&Path, u64, &ReleaseKey) -> (Built, Built),
    ) -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("nimbus-upd")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tmp");
        let key = ReleaseKey::generate().expect("key");
        let usr_size = usr_mib * MIB;
        let w = tmp.path();
        let (cur, next) = build(w, usr_size, &key);
        let disk = w.join("disk.raw");
        make_disk(&disk, usr_size, &cur.slot);
        let repo = w.join("repo");
        publish(&repo, &next.dir, "stable", &key, 14 * 86400);
        let httpd = httpd::Httpd::start(&repo);
        let root = host::root(
            &w.join("root"),
            &std::fs::read(cur.dir.join("trust.json")).expect("trust.json"),
            &format!(
                "GROUP=stable\nSERVER={}\nIO_WRITE_BPS=unlimited\n",
                httpd.url()
            ),
        )
        .expect("host root");
        Fixture {
            tmp,
            key,
            disk,
            root,
            repo,
            httpd,
            usr_size,
            next,
        }
    }

    pub fn engine(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ENGINE);
        c.arg("--root")
            .arg(&self.root)
            .arg("--disk")
            .arg(&self.disk)
            .args(args);
        c.env("NIMBUS_LOG", "info");
        c
    }

    /// `update-engine --once --json`, with its output.
    pub fn once(&self, extra: &[&str]) -> (Output, Option<serde_json::Value>) {
        let out = self
            .engine(&[
                "--once",
                "--json",
                "--read-timeout",
                "2",
                "--connect-timeout",
                "2",
                "--fetch-deadline",
                "5",
            ])
            .args(extra)
            .output()
            .expect("run update-engine");
        let status = serde_json::from_slice(&out.stdout).ok();
        (out, status)
    }

    pub fn partition_sha(&self, slot: Slot) -> String {
        let d = Disk::open_path(&self.disk, false).expect("open");
        let p = d.partition(slot.partition_number()).expect("part");
        let mut f = d.into_device();
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(p.offset_bytes())).expect("seek");
        let mut h = sha2::Sha256::new();
        let mut left = p.size_bytes();
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = (left as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).expect("read");
            h.update(&buf[..n]);
            left -= n as u64;
        }
        hex::encode(h.finalize())
    }

    /// sha256 of the payload as laid out in a slot: body from the start,
    /// the descriptor from the partition's last 4 KiB.
    pub fn slot_payload_sha(&self, slot: Slot, raw_size: u64) -> String {
        let d = Disk::open_path(&self.disk, false).expect("open");
        let p = d.partition(slot.partition_number()).expect("part");
        let f = d.into_device();
        use std::os::unix::fs::FileExt;
        let body = raw_size - 4096;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < body {
            let n = ((body - off) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], p.offset_bytes() + off)
                .expect("read");
            h.update(&buf[..n]);
            off += n as u64;
        }
        let mut desc = [0u8; 4096];
        f.read_exact_at(&mut desc, p.offset_bytes() + p.size_bytes() - 4096)
            .expect("read");
        h.update(desc);
        hex::encode(h.finalize())
    }

    /// (priority, tries, successful) of a slot, read with cgpt.
    pub fn cgpt(&self, slot: Slot) -> (u8, u8, u8) {
        nimbus_testkit::cgpt::attrs(&self.disk, slot.partition_number())
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(self.root.join("var/lib/nimbus/update-engine.json")).unwrap_or_default(),
        )
        .unwrap_or(serde_json::Value::Null)
    }
}

pub fn release(m: &nimbus::release::Manifest, v: &str) -> nimbus::release::Release {
    m.releases
        .iter()
        .find(|r| r.version.to_string() == v)
        .expect("release")
        .clone()
}

impl Fixture {
    pub fn manifest(&self) -> nimbus::release::Manifest {
        serde_json::from_slice(
            &std::fs::read(self.repo.join("channels/stable.json")).expect("manifest"),
        )
        .expect("parse")
    }

    /// Rewrite the stable manifest (edited) and sign it with `key`.
    pub fn resign(&self, key: &ReleaseKey, edit: impl FnOnce(&mut nimbus::release::Manifest)) {
        let mut m = self.manifest();
        edit(&mut m);
        let bytes = serde_json::to_vec_pretty(&m).expect("json");
        self.write_signed(key, &bytes);
    }

    /// Serve `bytes` as the stable manifest with a valid signature by `key`.
    pub fn write_signed(&self, key: &ReleaseKey, bytes: &[u8]) {
        let sigs = nimbus::release::Manifest::sign_bytes(bytes, &[key]);
        std::fs::write(self.repo.join("channels/stable.json"), bytes).expect("write");
        std::fs::write(
            self.repo.join("channels/stable.json.sig"),
            serde_json::to_vec(&sigs).expect("json"),
        )
        .expect("write");
    }

    pub fn payload_path(&self) -> PathBuf {
        self.repo.join("payloads/1.1.0/usr.img.zst")
    }
}

/// A FAT ESP in the fixture's partition 1, as build-image makes one.
pub fn format_esp(disk: &Path) {
    let d = Disk::open_path(disk, false).expect("disk");
    let p = d.partition(nimbus::layout::ESP_PARTITION).expect("esp");
    let img = disk.with_extension("esp");
    let _ = std::fs::remove_file(&img);
    let out = Command::new("mkfs.fat")
        .args(["-C"])
        .arg(&img)
        .arg((p.size_bytes() / 1024).to_string())
        .output()
        .expect("mkfs.fat (dosfstools)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&img).expect("read");
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("open");
    f.seek(SeekFrom::Start(p.offset_bytes())).expect("seek");
    f.write_all(&bytes).expect("write");
    f.sync_all().expect("sync");
}

/// What stage 1 does on a boot: take the chosen slot's try.
pub fn boot_rule(f: &Fixture) -> u32 {
    let mut d = Disk::open_path(&f.disk, true).expect("open disk");
    d.update_slots(|t| {
        nimbus::slots::select_for_boot(t, &[])
            .map(|c| c.number)
            .ok_or(nimbus::slots::SlotError::NotBootable(0))
    })
    .expect("boot rule")
}

/// What mark-good does after the health check.
pub fn mark_good(f: &Fixture, n: u32) {
    let mut d = Disk::open_path(&f.disk, true).expect("open disk");
    d.update_slots(|t| nimbus::slots::mark_good(t, n))
        .expect("mark good");
}

impl Fixture {
    /// Copy a slot's partition out and run `veritysetup verify` on it with
    /// the descriptor's geometry and `root`; panics with its words if it
    /// fails.
    pub fn veritysetup_verify(&self, slot: Slot, root: &str) {
        let d = Disk::open_path(&self.disk, false).expect("open");
        let p = d.partition(slot.partition_number()).expect("part");
        let f = d.into_device();
        use std::os::unix::fs::FileExt;
        let mut desc = vec![0u8; 4096];
        f.read_exact_at(&mut desc, p.offset_bytes() + p.size_bytes() - 4096)
            .expect("read");
        let fields = nimbus::release::SlotDescriptor::parse_unverified(&desc).expect("descriptor");
        let out = self
            .tmp
            .path()
            .join(format!("part{}", slot.partition_number()));
        let mut buf = vec![0u8; p.size_bytes() as usize];
        f.read_exact_at(&mut buf, p.offset_bytes()).expect("read");
        std::fs::write(&out, &buf).expect("write");
        let v = Command::new("veritysetup")
            .args([
                "verify",
                "--no-superblock",
                "--format=1",
                "--hash=sha256",
                "--data-block-size=4096",
                "--hash-block-size=4096",
                &format!("--data-blocks={}", fields.data_size / 4096),
                &format!("--hash-offset={}", fields.hash_offset),
                &format!("--salt={}", hex::encode(fields.verity_salt)),
            ])
            .arg(&out)
            .arg(&out)
            .arg(root)
            .output()
            .expect("veritysetup must be installed (.ci/packages.txt)");
        assert!(
            v.status.success(),
            "veritysetup verify: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        let _ = std::fs::remove_file(&out);
    }
}
