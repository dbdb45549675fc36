//! The GPT code on a real block device: a loop device over an image file,
//! read back by the real cgpt and sgdisk through the same device. This is
//! what the updater and the boot selector do on a host (/dev/vda), so the
//! test uses the kernel's block layer rather than a plain file.

use std::process::Command;

use nimbus::gpt::Disk;
use nimbus::layout::{self, Slot, MIB};
use nimbus::slots::{self, Prio};
use uuid::Uuid;

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it: cargo xtask deps): {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

use nimbus_testkit::loopdev::Loop;

#[test]
fn slot_protocol_on_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(1024 * MIB).unwrap();
    drop(f);
    let lo = Loop::attach(&img, None);

    // Create the layout through the block device, not the file.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lo.dev)
        .unwrap();
    let good = Prio {
        priority: 1,
        tries: 0,
        successful: true,
    };
    Disk::create(
        dev,
        &lo.dev,
        64 * MIB,
        Uuid::new_v4(),
        |_| Uuid::new_v4(),
        |s| {
            if s.number == 3 {
                good.apply_to(0)
            } else {
                0
            }
        },
    )
    .unwrap();
    assert!(ok("sgdisk", &["-v", &lo.dev]).contains("No problems found"));

    let mut d = Disk::open_path(std::path::Path::new(&lo.dev), true).unwrap();
    assert!(d.health().is_clean());
    d.update_slots(|t| slots::prioritize(t, Slot::B.partition_number()))
        .unwrap();
    drop(d);
    assert_eq!(ok("cgpt", &["show", "-i", "4", "-P", &lo.dev]).trim(), "2");
    assert_eq!(ok("cgpt", &["show", "-i", "4", "-T", &lo.dev]).trim(), "1");
    assert_eq!(ok("cgpt", &["show", "-i", "4", "-S", &lo.dev]).trim(), "0");

    // cgpt writes through the device; we read it back the same way.
    ok("cgpt", &["add", "-i", "4", "-T", "0", &lo.dev]);
    let mut d = Disk::open_path(std::path::Path::new(&lo.dev), true).unwrap();
    let choice = d
        .update_slots(|t| Ok(slots::select_for_boot(t, &[])))
        .unwrap()
        .unwrap();
    assert_eq!(choice.number, Slot::A.partition_number());

    // The kernel's partition scanner (partx) agrees on where USR-B lives.
    let p = d.partition(4).unwrap();
    drop(d);
    let partx = ok(
        "partx",
        &[
            "--show",
            "--output",
            "NR,START,END",
            "--noheadings",
            &lo.dev,
        ],
    );
    let row = partx
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|x| x.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .find(|r| r[0] == 4)
        .unwrap();
    assert_eq!((row[1], row[2]), (p.first_lba, p.last_lba));
    assert_eq!(p.size_bytes(), 64 * MIB);
    assert_eq!(layout::spec(4).unwrap().label, p.label);
}
