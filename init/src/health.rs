//! `nimbus-init mark-good`: the health checks after boot; a healthy slot
//! is marked good, a failed one recorded so stage 1 falls back.

use crate::bless::bless_stage1;
use crate::disk::find_running_disk;
use crate::say;
use nimbus::gpt::Disk;
use nimbus::layout::Slot;
use nimbus::release::SlotDescriptor;
use nimbus::slots;
use std::fs::{self};
use std::path::Path;
use std::time::Duration;

/// Why `unit` does not count as healthy, or `None` when it is active.
pub(crate) fn unit_failure(unit: &str) -> Option<String> {
    let active = std::process::Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .is_ok_and(|s| s.success());
    if active {
        return None;
    }
    let out = std::process::Command::new("systemctl")
        .args(["show", "-p", "ActiveState", "-p", "Result", unit])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("unknown")
            .to_string()
    };
    Some(format!(
        "required unit {unit} is {} (result: {})",
        field("ActiveState"),
        field("Result")
    ))
}

/// The health check failed on `slot`. An unproven slot is given up: the
/// reason goes to ROOT for update-engine to report after the fallback,
/// then the host reboots, and the boot rule (no tries left, not
/// successful) picks the previous slot. A proven slot, or one with nothing
/// to fall back to, stays up: rebooting would only come back to it.
pub(crate) fn health_failed<D: nimbus::gpt::BlockDevice>(
    disk: &Disk<D>,
    slot: Slot,
    partuuid: uuid::Uuid,
    version: &str,
    reason: &str,
) -> i32 {
    say(&format!(
        "nimbus-mark-good: health check failed on {slot} (version {version}): {reason}"
    ));
    let n = slot.partition_number();
    let target = match slots::on_health_failure(&disk.slot_table(), n) {
        slots::HealthFailureAction::StayProven => {
            say(&format!(
                "nimbus-mark-good: {slot} was proven good before; staying on it (no rollback)"
            ));
            return 1;
        }
        slots::HealthFailureAction::NoFallback => {
            say("nimbus-mark-good: no other bootable slot to fall back to; staying up");
            return 1;
        }
        slots::HealthFailureAction::FallBack(t) => t,
    };
    let record = nimbus::boot::HealthFailure {
        partition: n,
        partuuid,
        version: version.to_string(),
        reason: reason.to_string(),
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    };
    let path = Path::new("/").join(nimbus::boot::HEALTH_FAILURE_PATH);
    if let Some(dir) = path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    // Written durably before the reboot: the fallback boot must be able to
    // say why. Failing to record is reported but does not stop the fallback.
    if let Err(e) = nimbus::durable::write_atomic(&path, &record.to_json(), 0o644) {
        say(&format!("nimbus-mark-good: cannot record the failure: {e}"));
    }
    let target_label = Slot::from_partition_number(target)
        .map_or_else(|| format!("partition {target}"), |s| s.to_string());
    if std::env::var("NIMBUS_HEALTH_ON_FAILURE").as_deref() == Ok("none") {
        say(&format!(
            "nimbus-mark-good: {slot} has no tries left; the next boot falls back to {target_label} (NIMBUS_HEALTH_ON_FAILURE=none: not rebooting)"
        ));
        return 1;
    }
    say(&format!(
        "nimbus-mark-good: {slot} has no tries left: rebooting to fall back to {target_label}"
    ));
    match std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
    {
        Ok(s) if s.success() => 1,
        r => {
            say(&format!(
                "nimbus-mark-good: systemctl reboot failed ({r:?})"
            ));
            1
        }
    }
}

pub(crate) fn mark_good() -> i32 {
    let delay: u64 = std::env::var("NIMBUS_HEALTH_DELAY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let units: Vec<String> = std::env::var("NIMBUS_HEALTH_UNITS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let cmdline = nimbus::boot::booted_cmdline(Path::new("/")).unwrap_or_default();
    let Some(args) = nimbus::boot::parse_cmdline(&cmdline) else {
        eprintln!(
            "nimbus-mark-good: not booted through nimbus-init (no nimbus.usr= on the command line)"
        );
        return 1;
    };
    std::thread::sleep(Duration::from_secs(delay));
    let failure = units.iter().find_map(|u| unit_failure(u));
    let (disk_name, mut disk) = match find_running_disk(&args, true) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nimbus-mark-good: {e}");
            return 1;
        }
    };
    let Some(slot) = Slot::ALL
        .into_iter()
        .find(|s| disk.partition(s.partition_number()).ok().map(|p| p.uuid) == Some(args.partuuid))
    else {
        eprintln!(
            "nimbus-mark-good: no USR slot with PARTUUID {}",
            args.partuuid
        );
        return 1;
    };
    let version = disk
        .read_descriptor(slot)
        .ok()
        .and_then(|b| SlotDescriptor::parse_unverified(&b).ok())
        .map(|d| d.version.to_string())
        .unwrap_or_else(|| "unknown".into());
    if let Some(reason) = failure {
        return health_failed(&disk, slot, args.partuuid, &version, &reason);
    }
    match disk.update_slots(|t| slots::mark_good(t, slot.partition_number())) {
        Ok(()) => {
            say(&format!(
                "nimbus-mark-good: {slot} marked good (version {version})"
            ));
            if let Some(copy) = nimbus::esp::running_copy(&cmdline) {
                bless_stage1(&disk_name, copy, Path::new("/run/nimbus/mark-good/esp"));
            }
            0
        }
        Err(e) => {
            eprintln!("nimbus-mark-good: {e}");
            1
        }
    }
}
