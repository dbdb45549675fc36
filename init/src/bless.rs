//! `nimbus-init bless-stage1`: the stage-1 copy this boot ran from is
//! recorded as good on the ESP.

use crate::disk::{find_running_disk, partition_dev};
use crate::say;
use nimbus::layout::{self, Slot};
use std::path::Path;

/// `nimbus-init mark-good`: after the boot-health delay, if every required
/// unit is active, mark the booted slot good; otherwise give an unproven
/// slot up (see [`health_failed`]).
/// The stage 1 that booted a slot now marked good becomes the default of
/// both loaders (nimbus::esp::bless). Not fatal: the old copy stays the
/// default, which boots too; the reason is recorded for `updatectl
/// status` and update-engine retries at its next start. Returns whether
/// the copy is the default now.
pub(crate) fn bless_stage1(disk_name: &str, copy: nimbus::esp::Copy, mnt: &Path) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let out = match partition_dev(disk_name, layout::ESP_PARTITION) {
        Ok((_, dev)) => nimbus::esp::bless_recorded(
            &nimbus::esp::MountedEsp {
                dev,
                mnt: mnt.to_path_buf(),
            },
            copy,
            Path::new("/"),
            now,
        ),
        Err(e) => nimbus::esp::BlessOutcome {
            result: Err(nimbus::esp::EspError::Invalid(e)),
            record_error: None,
        },
    };
    if let Some(e) = &out.record_error {
        eprintln!(
            "nimbus-mark-good: recording the stage-1 bless in /{}: {e}",
            nimbus::paths::STAGE1_BLESS_FAILURE
        );
    }
    match out.result {
        Ok(true) => {
            say(&format!(
                "nimbus-mark-good: stage 1 copy {copy} is now the default of both loaders"
            ));
            true
        }
        Ok(false) => true,
        Err(e) => {
            say(&format!(
                "nimbus-mark-good: stage 1 copy {copy} not made the default: {e} (recorded; update-engine retries at its next start)"
            ));
            false
        }
    }
}

/// `nimbus-init bless-stage1 [--check]`: make the running stage 1 the
/// default of both loaders now, as mark-good does after marking the slot
/// good (the slot must be good already); `--check` only reads the ESP and
/// says whether it is. Exit 0 when it is the default, 1 when not.
pub(crate) fn bless_stage1_cmd(check: bool) -> i32 {
    let cmdline = nimbus::boot::booted_cmdline(Path::new("/")).unwrap_or_default();
    let Some(args) = nimbus::boot::parse_cmdline(&cmdline) else {
        eprintln!("nimbus-init bless-stage1: not booted through nimbus-init (no nimbus.usr=)");
        return 2;
    };
    let Some(copy) = nimbus::esp::running_copy(&cmdline) else {
        eprintln!("nimbus-init bless-stage1: the loader did not say which stage-1 copy it started (no nimbus.stage1=)");
        return 2;
    };
    let (disk_name, disk) = match find_running_disk(&args, false) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nimbus-init bless-stage1: {e}");
            return 2;
        }
    };
    let mnt = Path::new("/run/nimbus/bless/esp");
    if check {
        let r = partition_dev(&disk_name, layout::ESP_PARTITION).and_then(|(_, dev)| {
            let mut blessed = false;
            nimbus::esp::with_mounted(&dev, mnt, false, &mut |fs| {
                blessed = nimbus::esp::is_blessed(fs, copy)?;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
            Ok(blessed)
        });
        return match r {
            Ok(true) => {
                println!("stage 1 copy {copy} is the default of both loaders");
                0
            }
            Ok(false) => {
                println!("stage 1 copy {copy} is not the default of both loaders");
                1
            }
            Err(e) => {
                eprintln!("nimbus-init bless-stage1 --check: {e}");
                2
            }
        };
    }
    let good = Slot::ALL.into_iter().any(|s| {
        disk.partition(s.partition_number()).ok().map(|p| p.uuid) == Some(args.partuuid)
            && disk
                .slot_table()
                .iter()
                .any(|e| e.number == s.partition_number() && e.prio().successful)
    });
    if !good {
        eprintln!("nimbus-init bless-stage1: the booted slot is not marked good yet (mark-good blesses after it)");
        return 1;
    }
    if bless_stage1(&disk_name, copy, mnt) {
        println!("stage 1 copy {copy} is the default of both loaders");
        0
    } else {
        1
    }
}
