//! `cargo xtask build-image` end to end, checked by the real tools: sgdisk,
//! cgpt, veritysetup, fsck.erofs, fsck.vfat, e2fsck, debugfs, qemu-img and a
//! loop mount of the USR filesystem. The first build fills the rootfs cache
//! under target/nimbus/cache; the second must hit it and produce the same
//! USR slot bit for bit.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nimbus_testkit::ROOTFS_EPOCH as EPOCH;

/// A tool on the image (sgdisk, cgpt, veritysetup, mount...): seconds.
fn run(cmd: &str, args: &[&str]) -> Output {
    nimbus_testkit::proc::output(
        Command::new(cmd).args(args),
        std::time::Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e} (cargo xtask deps installs the tools)"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// build-image with test defaults; a flag in `extra` replaces its default.
fn build(out: &Path, extra: &[&str]) -> Output {
    let defaults = [
        ("--version", "1.0.0"),
        ("--channel", "beta"),
        ("--out", s(out)),
        ("--disk-size", "3G"),
    ];
    let mut args = vec!["build-image"];
    for (k, v) in defaults {
        if !extra.contains(&k) {
            args.extend([k, v]);
        }
    }
    args.extend_from_slice(extra);
    // A cold build takes about 3 minutes here.
    nimbus_testkit::proc::output(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(&args)
            .env("SOURCE_DATE_EPOCH", EPOCH),
        std::time::Duration::from_secs(1200),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(out.join("build.json")).unwrap()).unwrap()
}

/// (first LBA, last LBA) of a partition, from sgdisk.
fn part(img: &Path, n: u32) -> (u64, u64) {
    let info = ok("sgdisk", &["-i", &n.to_string(), s(img)]);
    let get = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    (get("First sector"), get("Last sector"))
}

fn extract(img: &Path, n: u32, to: &Path) {
    let (a, b) = part(img, n);
    ok(
        "dd",
        &[
            &format!("if={}", s(img)),
            &format!("of={}", s(to)),
            "bs=512",
            &format!("skip={a}"),
            &format!("count={}", b - a + 1),
            "status=none",
        ],
    );
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn build_image_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let ud = d.path().join("user-data");
    fs::write(&ud, "#cloud-config\nhostname: built-in\n").unwrap();
    let out1 = d.path().join("out1");
    let o = build(&out1, &["--user-data", s(&ud)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r1 = report(&out1);
    let raw = out1.join("nimbus.raw");
    for a in [
        "nimbus.raw",
        "nimbus.qcow2",
        "nimbus.box",
        "usr.img.zst",
        "build.json",
        "trust.json",
    ] {
        assert!(out1.join(a).is_file(), "{a} missing");
    }
    let names: Vec<String> = fs::read_dir(&out1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "temporary files left: {names:?}"
    );

    // GPT and slots.
    let v = ok("sgdisk", &["-v", s(&raw)]);
    assert!(
        v.contains("No problems found") && !v.contains("Caution") && !v.contains("Warning"),
        "{v}"
    );
    let cg = |i: &str, f: &str| {
        ok("cgpt", &["show", "-i", i, f, s(&raw)])
            .trim()
            .to_string()
    };
    assert_eq!(
        (cg("3", "-P"), cg("3", "-T"), cg("3", "-S")),
        ("1".into(), "0".into(), "1".into())
    );
    assert_eq!(
        (cg("4", "-P"), cg("4", "-T"), cg("4", "-S")),
        ("0".into(), "0".into(), "0".into())
    );
    // Pristine disk GUID (per-host GUIDs come at first boot).
    let info = ok("sgdisk", &["-p", s(&raw)]);
    assert!(
        info.contains("Disk identifier (GUID): 00000000-0000-0000-0000-000000000001"),
        "{info}"
    );
    // BIOS boot: GRUB's boot.img in the MBR pointing at its core image at
    // the start of BIOS-BOOT, whose block list points at the next sector.
    let (bios_first, _) = part(&raw, 2);
    let read_at = |off: u64| {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(&raw).unwrap();
        let mut b = vec![0u8; 512];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut b).unwrap();
        b
    };
    let bytes = read_at(0);
    assert_eq!(&bytes[0x1fe..0x200], &[0x55, 0xaa]);
    assert!(
        bytes[..0x1b8].iter().any(|&b| b != 0),
        "MBR boot code is empty"
    );
    let kernel_sector = u64::from_le_bytes(bytes[0x5c..0x64].try_into().unwrap());
    assert_eq!(kernel_sector, bios_first);
    let core = read_at(bios_first * 512);
    let next = u64::from_le_bytes(core[0x1f4..0x1fc].try_into().unwrap());
    assert_eq!(next, bios_first + 1);
    let boot_img = fs::read("/usr/lib/grub/i386-pc/boot.img").unwrap();
    assert_eq!(&bytes[0x68..0x1b8], &boot_img[0x68..0x1b8], "boot.img code");

    // USR-A: verity over the filesystem with the root from the descriptor.
    let show: serde_json::Value = serde_json::from_str(&ok(
        env!("CARGO_BIN_EXE_xtask"),
        &[
            "disk",
            "show",
            s(&raw),
            "--json",
            "--keys",
            s(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nimbus/dev-key")),
        ],
    ))
    .unwrap();
    let desc = show["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["number"] == 3)
        .unwrap()["descriptor"]
        .clone();
    assert_eq!(desc["signature_valid"], true, "{desc}");
    assert_eq!(desc["version"], "1.0.0");
    assert_eq!(desc["verity_root"], r1["verity_root"]);
    let data_size = desc["data_size"].as_u64().unwrap();
    let usra = d.path().join("usra");
    extract(&raw, 3, &usra);
    ok(
        "veritysetup",
        &[
            "verify",
            "--no-superblock",
            "--format=1",
            "--hash=sha256",
            "--data-block-size=4096",
            "--hash-block-size=4096",
            &format!("--data-blocks={}", data_size / 4096),
            &format!("--hash-offset={}", desc["hash_offset"]),
            &format!("--salt={}", desc["verity_salt"].as_str().unwrap()),
            s(&usra),
            s(&usra),
            desc["verity_root"].as_str().unwrap(),
        ],
    );
    let fs_img = d.path().join("usr.erofs");
    let bytes = fs::read(&usra).unwrap();
    fs::write(&fs_img, &bytes[..data_size as usize]).unwrap();
    drop(bytes);
    ok("fsck.erofs", &[s(&fs_img)]);

    // What USR carries.
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    ok(
        "mount",
        &["-t", "erofs", "-o", "loop,ro", s(&fs_img), s(&mnt)],
    );
    let _m = Mount(mnt.clone());
    for p in [
        "bin/etcd",
        "bin/containerd",
        "lib/systemd/systemd",
        "sbin/sshd",
        "bin/cloud-config",
        "bin/update-engine",
        "bin/updatectl",
        // image/bin: docs/toolbox.md.
        "bin/toolbox",
        "lib/systemd/system/update-engine.service",
        "lib/systemd/system/cloud-config.service",
        "lib/systemd/system/oem.mount",
        "lib/systemd/system/nimbus-ssh-keygen.service",
        // etcd restarts when its address is not there yet (drop-ins ship too).
        "lib/systemd/system/etcd.service.d/10-nimbus.conf",
        // update-engine's default hooks.
        "lib/nimbus/hooks/pre-reboot.d/50-swarm-drain",
        "lib/nimbus/hooks/pre-reboot.d/60-etcd-leader",
        "lib/nimbus/hooks/post-good.d/50-swarm-activate",
        // Links down before the kernel reboots (virtio-net's shutdown spin).
        "lib/systemd/system-shutdown/nimbus-quiesce-net",
        // Enabled from /usr, so units an update adds start on old hosts too.
        "lib/systemd/system/multi-user.target.wants/cloud-config.service",
        "lib/systemd/system/multi-user.target.wants/update-engine.service",
        "lib/systemd/system/multi-user.target.wants/nimbus-mark-good.service",
        // Docker on demand: the socket listens; dockerd starts where
        // containers were left.
        "lib/systemd/system/sockets.target.wants/docker.socket",
        "lib/systemd/system/multi-user.target.wants/nimbus-docker-resume.service",
        "share/nimbus/update.conf",
        // The journal persists on ROOT (journalctl -b -1 after a rollback).
        "lib/systemd/journald.conf.d/10-nimbus.conf",
        "lib/nimbus/boot/vmlinuz",
        "share/factory/etc/passwd",
        // What stays beside what is left out (docs/image.md): perl-base
        // (debconf), the runc v2 shim dockerd uses, the C.UTF-8 locale.
        "bin/perl",
        "bin/containerd-shim-runc-v2",
        "bin/docker",
        "sbin/dockerd",
        "lib/locale/C.utf8",
    ] {
        assert!(mnt.join(p).exists(), "/usr/{p} missing from USR");
    }
    for p in [
        "bin/apt-get",
        "bin/dpkg",
        "bin/apt",
        // docs/image.md, "What USR leaves out" (rootfs::DROPPED_*).
        "share/locale",
        "bin/ctr",
        "bin/dnet",
        "sbin/ovrouter",
        "bin/containerd-shim",
        "bin/containerd-shim-runc-v1",
        "bin/cpan",
        "share/perl",
        "lib/x86_64-linux-gnu/libapt-pkg.so.6.0",
        "bin/gpgv",
        // On demand, not at every boot (docs/image.md): not wanted by
        // USR nor by the /etc a fresh host starts from.
        "lib/systemd/system/multi-user.target.wants/docker.service",
        "share/factory/etc/systemd/system/multi-user.target.wants/docker.service",
        "share/factory/etc/systemd/system/multi-user.target.wants/containerd.service",
        "share/factory/etc/systemd/system/multi-user.target.wants/etcd.service",
        // Timers of packages left out (apt, dpkg's backup) would dangle.
        "share/factory/etc/systemd/system/timers.target.wants/apt-daily.timer",
        "share/factory/etc/systemd/system/timers.target.wants/dpkg-db-backup.timer",
    ] {
        assert!(
            fs::symlink_metadata(mnt.join(p)).is_err(),
            "/usr/{p} must not ship"
        );
    }
    // The trust set: the signing key, threshold 1, version 1, the same in
    // USR and beside the build (where the release step starts from).
    let trust = nimbus::trust::load(&mnt.join("share/nimbus/trust.json")).unwrap();
    assert_eq!(
        (trust.version, trust.threshold, trust.keys.len()),
        (1, 1, 1)
    );
    assert_eq!(
        fs::read(mnt.join("share/nimbus/trust.json")).unwrap(),
        fs::read(out1.join("trust.json")).unwrap()
    );
    let osr = fs::read_to_string(mnt.join("lib/os-release")).unwrap();
    assert!(
        osr.contains("ID=nimbus")
            && osr.contains("VERSION_ID=1.0.0")
            && osr.contains("NIMBUS_DEV_KEY=yes"),
        "{osr}"
    );
    let conf = fs::read_to_string(mnt.join("share/nimbus/update.conf")).unwrap();
    assert!(conf.contains("GROUP=beta"), "{conf}");
    drop(_m);

    // ESP, OEM, ROOT, qcow2, box.
    let p1 = d.path().join("p1");
    extract(&raw, 1, &p1);
    ok("fsck.vfat", &["-n", s(&p1)]);
    let entry = ok("mtype", &["-i", s(&p1), "::loader/entries/nimbus-1-a.conf"]);
    assert!(entry.contains("linux /nimbus/a/vmlinuz"), "{entry}");
    assert!(entry.contains("nimbus.stage1=a"), "{entry}");
    // Stage 1 on the ESP is the one beside the build (what a release
    // publishes and update-engine installs into the other copy).
    let esp_initrd = d.path().join("esp-stage1.img");
    ok(
        "mcopy",
        &["-n", "-i", s(&p1), "::nimbus/a/stage1.img", s(&esp_initrd)],
    );
    assert_eq!(
        fs::read(&esp_initrd).unwrap(),
        fs::read(out1.join("stage1/stage1.img")).unwrap()
    );
    let env = d.path().join("grubenv");
    ok("mcopy", &["-n", "-i", s(&p1), "::nimbus/grubenv", s(&env)]);
    assert_eq!(fs::read(&env).unwrap().len(), 1024);
    ok("mdir", &["-i", s(&p1), "::EFI/BOOT/BOOTX64.EFI"]);
    let p6 = d.path().join("p6");
    extract(&raw, 6, &p6);
    ok("e2fsck", &["-fn", s(&p6)]);
    assert!(ok("debugfs", &["-R", "cat /user-data", s(&p6)]).contains("hostname: built-in"));
    let p9 = d.path().join("p9");
    extract(&raw, 9, &p9);
    ok("e2fsck", &["-fn", s(&p9)]);
    let etc = ok(
        "debugfs",
        &[
            "-R",
            "ls /etc/systemd/system/multi-user.target.wants",
            s(&p9),
        ],
    );
    assert!(etc.contains("systemd-networkd.service"), "{etc}");
    assert!(
        !ok("debugfs", &["-R", "ls /etc/ssh", s(&p9)]).contains("ssh_host_ed25519_key"),
        "host keys must not ship"
    );
    let hosts = ok("debugfs", &["-R", "cat /etc/hosts", s(&p9)]);
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    let resolv = ok("debugfs", &["-R", "cat /etc/resolv.conf", s(&p9)]);
    assert!(
        !resolv.contains("nameserver"),
        "the build host's resolver leaked: {resolv}"
    );
    ok("qemu-img", &["check", s(&out1.join("nimbus.qcow2"))]);
    let meta = ok(
        "tar",
        &["-xOf", s(&out1.join("nimbus.box")), "metadata.json"],
    );
    let meta: serde_json::Value = serde_json::from_str(meta.trim()).unwrap();
    assert_eq!(meta["provider"], "libvirt");
    assert_eq!(meta["format"], "qcow2");
    assert_eq!(meta["virtual_size"], 3);

    // The payload is USR-A's content: fs + tree from the start, descriptor last.
    let dec = d.path().join("payload.raw");
    ok(
        "zstd",
        &["-d", "-q", "-o", s(&dec), s(&out1.join("usr.img.zst"))],
    );
    let p = fs::read(&dec).unwrap();
    let a = fs::read(&usra).unwrap();
    let body = p.len() - 4096;
    assert!(p[..body] == a[..body], "payload body differs from USR-A");
    assert!(
        p[body..] == a[a.len() - 4096..],
        "payload descriptor differs from USR-A's"
    );
    assert_eq!(p.len() as u64, r1["payload"]["raw_size"].as_u64().unwrap());

    // The same inputs again: the image cache answers, with the same
    // artifacts, and nothing is built.
    let again = d.path().join("again");
    let o = build(&again, &["--user-data", s(&ud)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("from the image cache"), "{err}");
    assert!(!err.contains("rootfs ..."), "built again: {err}");
    assert_eq!(report(&again), r1);
    assert_eq!(
        fs::read(again.join("nimbus.qcow2")).unwrap(),
        fs::read(out1.join("nimbus.qcow2")).unwrap()
    );

    // Second build (other formats: another cache key): rootfs cache hit,
    // identical USR slot.
    let out2 = d.path().join("out2");
    let o = build(&out2, &["--user-data", s(&ud), "--formats", "raw"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2 = report(&out2);
    assert_eq!(r2["rootfs_cache"], "hit");
    assert_eq!(
        r2["usr_slot_sha256"], r1["usr_slot_sha256"],
        "USR slot not reproducible"
    );
    assert_eq!(r2["payload"]["raw_sha256"], r1["payload"]["raw_sha256"]);
    assert!(
        !out2.join("nimbus.qcow2").exists(),
        "--formats raw builds no qcow2"
    );

    // USR larger than --usr-size: clear error, nothing under a final name.
    let out3 = d.path().join("out3");
    let o = build(&out3, &["--usr-size", "256M", "--formats", "raw"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("USR needs") && err.contains("--usr-size is 256 MiB"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(&out3)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_build_inputs_fail_fast() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    // A trust set none of whose keys signs this build, and a broken one.
    let other = nimbus::keys::ReleaseKey::from_secret([7; 32]);
    let foreign = d.path().join("foreign-trust.json");
    fs::write(
        &foreign,
        nimbus::trust::TrustDoc::initial([other.public()], 1).to_bytes(),
    )
    .unwrap();
    let broken = d.path().join("broken-trust.json");
    fs::write(
        &broken,
        "{\"schema\": 1, \"version\": 1, \"threshold\": 2, \"keys\": []}",
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--trust", s(&foreign)], 1, "only 0 of the --key keys"),
        (vec!["--trust", s(&broken)], 1, "0 keys"),
        (
            vec!["--trust", "/nonexistent/trust.json"],
            1,
            "/nonexistent/trust.json",
        ),
        (vec!["--disk-size", "1G"], 1, "too small"),
        (vec!["--formats", "raw,vhd"], 2, "unknown format"),
        (vec!["--key", "/nonexistent/keys"], 1, "no such directory"),
        (vec!["--channel", "Bad Channel"], 1, "not a valid channel"),
        (vec!["--usr-size", "1000"], 1, "multiple of 1 MiB"),
        (vec!["--user-data", "/nonexistent/ud"], 1, "/nonexistent/ud"),
    ];
    for (extra, code, msg) in cases {
        let o = build(&out, &extra);
        assert_eq!(o.status.code(), Some(code), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{extra:?}: {err}");
        if out.exists() {
            assert_eq!(
                fs::read_dir(&out).unwrap().count(),
                0,
                "{extra:?} left files"
            );
        }
    }
    let ro = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["build-image", "--out", "/proc/nimbus-out"])
        .output()
        .unwrap();
    assert_eq!(ro.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&ro.stderr).contains("--out /proc/nimbus-out"));
}
