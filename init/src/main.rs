//! `/init` of the Nimbus initramfs, and `nimbus-init mark-good`.
//!
//! Stage 1 (no `nimbus.usr=` on the command line): load modules, find the
//! Nimbus disk, apply the boot rule (persisting the tries decrement), verify
//! the slot's descriptor, map it with dm-verity, mount it, and kexec the
//! slot's own kernel and initramfs. A slot that fails any check is reported
//! on the console and the next candidate is tried in the same boot.
//!
//! Stage 2 (`nimbus.usr=PARTUUID=... nimbus.usrhash=...`): map the same slot
//! again, mount ROOT at /sysroot and the verified USR at /sysroot/usr, and
//! switch_root into systemd.
//!
//! This runs as PID 1: it never returns; a fatal error prints why and halts.

mod bless;
mod disk;
mod dm;
mod health;
mod stage1;
mod stage2;

use crate::bless::bless_stage1_cmd;
use crate::health::mark_good;
use crate::stage1::stage1;
use crate::stage2::stage2;
use nix::mount::{mount, MsFlags};
use std::fs::{self, File};
use std::io::Write;
use std::time::Duration;

pub(crate) fn say(msg: &str) {
    // stdout is /dev/console for PID 1; one write per line keeps lines whole.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{msg}\n").as_bytes());
    let _ = out.flush();
}

pub(crate) fn emergency(why: &str) -> ! {
    say(&format!("nimbus-init: EMERGENCY: {why}"));
    say("nimbus-init: no verified USR slot can be booted; halting (the disk was not changed further)");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

pub(crate) type R<T> = Result<T, String>;

pub(crate) fn mount_basics() {
    for (src, dst, fs) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = fs::create_dir_all(dst);
        let _ = mount(Some(src), dst, Some(fs), MsFlags::MS_NOSUID, None::<&str>);
    }
}

pub(crate) fn load_modules() {
    let Ok(list) = fs::read_to_string("/lib/modules/load.list") else {
        return;
    };
    let kver = fs::read_dir("/lib/modules")
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().filter(|e| e.path().is_dir()).map(|e| e.path())));
    let Some(base) = kver else { return };
    for m in list.lines().filter(|l| !l.is_empty()) {
        let p = base.join(m);
        match File::open(&p) {
            Ok(f) => {
                if let Err(e) =
                    nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty())
                {
                    // ENODEV: efivarfs on a machine booted without UEFI.
                    if e != nix::errno::Errno::EEXIST && e != nix::errno::Errno::ENODEV {
                        say(&format!("nimbus-init: module {m}: {e}"));
                    }
                }
            }
            Err(e) => say(&format!("nimbus-init: module {m}: {e}")),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("mark-good") => std::process::exit(mark_good()),
        Some("bless-stage1") => {
            let check = match args.get(2).map(String::as_str) {
                None => false,
                Some("--check") => true,
                Some(a) => {
                    eprintln!("nimbus-init bless-stage1: unknown argument {a:?} (only --check)");
                    std::process::exit(2);
                }
            };
            std::process::exit(bless_stage1_cmd(check));
        }
        _ => {}
    }
    if std::process::id() != 1 {
        eprintln!("usage: nimbus-init mark-good | nimbus-init bless-stage1 [--check]   (as /init it must run as PID 1)");
        std::process::exit(2);
    }
    mount_basics();
    load_modules();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match nimbus::boot::parse_cmdline(&cmdline) {
        Some(a) => stage2(a),
        None => stage1(),
    }
}
