//! The format writers against the real tools: veritysetup, cpio, fsck.vfat
//! and mtools (installed by .ci/run; a missing tool fails the test).

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output};

use nimbus_image::{cpio::Cpio, esp, slice::Slice, verity};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (cargo xtask deps installs it): {e}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Data with structure, not just zeros, so every hash differs.
fn data(blocks: usize) -> Vec<u8> {
    (0..blocks * 4096)
        .map(|i| ((i / 4096) as u8) ^ (i as u8).wrapping_mul(31))
        .collect()
}

fn verify(data_path: &Path, hash_path: &Path, blocks: u64, salt: &str, root: &[u8]) -> Output {
    run(
        "veritysetup",
        &[
            "verify",
            "--no-superblock",
            "--format=1",
            "--hash=sha256",
            "--data-block-size=4096",
            "--hash-block-size=4096",
            &format!("--data-blocks={blocks}"),
            &format!("--salt={salt}"),
            s(data_path),
            s(hash_path),
            &hex::encode(root),
        ],
    )
}

#[test]
fn verity_tree_is_accepted_by_veritysetup() {
    let d = tempfile::tempdir().unwrap();
    // 1 block, one level; 200 blocks, two levels; 20000 blocks, three levels.
    for blocks in [1usize, 200, 20_000] {
        let bytes = data(blocks);
        let dp = d.path().join(format!("data{blocks}"));
        let hp = d.path().join(format!("hash{blocks}"));
        fs::write(&dp, &bytes).unwrap();
        let salt = [0x5au8; 32];
        let t = verity::build(&bytes[..], bytes.len() as u64, &salt).unwrap();
        fs::write(&hp, &t.bytes).unwrap();
        let o = verify(&dp, &hp, blocks as u64, &hex::encode(salt), &t.root);
        assert!(
            o.status.success(),
            "{blocks} blocks: {}",
            String::from_utf8_lossy(&o.stderr)
        );

        // Our tree equals the one veritysetup itself writes.
        let theirs = d.path().join(format!("theirs{blocks}"));
        let o = run(
            "veritysetup",
            &[
                "format",
                "--no-superblock",
                "--format=1",
                "--hash=sha256",
                "--data-block-size=4096",
                "--hash-block-size=4096",
                &format!("--salt={}", hex::encode(salt)),
                s(&dp),
                s(&theirs),
            ],
        );
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&hex::encode(t.root)), "root differs: {out}");
        assert_eq!(fs::read(&theirs).unwrap()[..t.bytes.len()], t.bytes[..]);

        // One flipped data bit is caught by the real checker.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        fs::write(&dp, &bad).unwrap();
        assert!(
            !verify(&dp, &hp, blocks as u64, &hex::encode(salt), &t.root)
                .status
                .success()
        );
    }
}

#[test]
fn cpio_archive_lists_and_extracts_with_gnu_cpio() {
    let d = tempfile::tempdir().unwrap();
    let mut c = Cpio::new(Vec::new(), 0);
    c.dir("lib").unwrap();
    c.dir("lib/modules").unwrap();
    c.file("init", 0o755, b"#!/bin/true\n").unwrap();
    c.file("lib/modules/a.ko", 0o644, &[1, 2, 3]).unwrap();
    c.symlink("sbin", "lib").unwrap();
    let bytes = c.finish().unwrap();
    assert_eq!(bytes.len() % 512, 0);
    let arc = d.path().join("a.cpio");
    fs::write(&arc, &bytes).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && cpio -idm --quiet < {}",
            s(d.path()),
            s(&arc)
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(d.path().join("init")).unwrap(), b"#!/bin/true\n");
    assert_eq!(
        fs::read(d.path().join("lib/modules/a.ko")).unwrap(),
        [1, 2, 3]
    );
    assert_eq!(
        fs::read_link(d.path().join("sbin")).unwrap(),
        Path::new("lib")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(d.path().join("init"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    // Same input, same bytes.
    let mut c2 = Cpio::new(Vec::new(), 0);
    c2.dir("lib").unwrap();
    c2.dir("lib/modules").unwrap();
    c2.file("init", 0o755, b"#!/bin/true\n").unwrap();
    c2.file("lib/modules/a.ko", 0o644, &[1, 2, 3]).unwrap();
    c2.symlink("sbin", "lib").unwrap();
    assert_eq!(c2.finish().unwrap(), bytes);
}

#[test]
fn esp_is_a_clean_fat32() {
    let d = tempfile::tempdir().unwrap();
    let part = d.path().join("esp.img");
    let mut files = nimbus::esp::initial_files("1.0.0", "console=ttyS0").unwrap();
    files.push(("EFI/BOOT/BOOTX64.EFI".into(), vec![0x4d, 0x5a, 0, 0]));
    files.push(("nimbus/a/vmlinuz".into(), vec![9u8; 3 << 20]));
    esp::build(&part, 64 << 20, &files, &d.path().join("staging"), 0).unwrap();
    assert_eq!(fs::metadata(&part).unwrap().len(), 64 << 20);

    let o = run("fsck.vfat", &["-n", s(&part)]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run("minfo", &["-i", s(&part), "::"]);
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("EFI-SYSTEM") && info.contains("FAT32"),
        "{info}"
    );
    let o = run(
        "mtype",
        &["-i", s(&part), "::loader/entries/nimbus-1-a.conf"],
    );
    let entry = String::from_utf8_lossy(&o.stdout);
    assert!(
        entry.contains("linux /nimbus/a/vmlinuz")
            && entry.contains("options console=ttyS0 nimbus.stage1=a"),
        "{entry}"
    );
    let out = d.path().join("vmlinuz");
    assert!(
        run("mcopy", &["-i", s(&part), "::nimbus/a/vmlinuz", s(&out)])
            .status
            .success()
    );
    assert_eq!(fs::read(&out).unwrap(), vec![9u8; 3 << 20]);
    let env = d.path().join("grubenv");
    assert!(run("mcopy", &["-i", s(&part), "::nimbus/grubenv", s(&env)])
        .status
        .success());
    let env = fs::read(&env).unwrap();
    assert_eq!(env.len(), 1024);
    let g = nimbus::esp::Grubenv::parse(&env).unwrap();
    assert_eq!(g.grub_boot().0, nimbus::esp::Copy::A);
}

#[test]
fn slice_stays_inside_its_window() {
    let mut v = std::io::Cursor::new(vec![0u8; 100]);
    let mut sl = Slice::new(&mut v, 10, 20);
    sl.write_all(&[1u8; 20]).unwrap();
    assert!(sl.write_all(&[2u8]).is_err());
    sl.seek(SeekFrom::End(-5)).unwrap();
    let v = v.into_inner();
    assert!(v[..10].iter().all(|&b| b == 0) && v[30..].iter().all(|&b| b == 0));
    assert!(v[10..30].iter().all(|&b| b == 1));
}
