//! Slot attributes read and set with the real `cgpt` (vboot's tool), so
//! tests check Nimbus's GPT writes against an independent reader.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::proc;

fn cgpt(args: &[&str], disk: &Path) -> String {
    let o = proc::output(
        Command::new("cgpt").args(args).arg(disk),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e} (cargo xtask deps installs cgpt)"));
    assert!(
        o.status.success(),
        "cgpt {args:?} {}: {}",
        disk.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// (priority, tries, successful) of partition `part`.
pub fn attrs(disk: &Path, part: u32) -> (u8, u8, u8) {
    let get = |f: &str| -> u8 {
        let v = cgpt(&["show", "-i", &part.to_string(), f], disk);
        v.parse()
            .unwrap_or_else(|_| panic!("cgpt show {f}: {v:?} is not a number"))
    };
    (get("-P"), get("-T"), get("-S"))
}

/// Set partition `part`'s (priority, tries, successful).
pub fn set(disk: &Path, part: u32, (p, t, s): (u8, u8, u8)) {
    cgpt(
        &[
            "add",
            "-i",
            &part.to_string(),
            "-P",
            &p.to_string(),
            "-T",
            &t.to_string(),
            "-S",
            &s.to_string(),
        ],
        disk,
    );
}
