//! Rollback detection, run once at start: the slot this host tried and
//! gave up is recorded (a report for `updatectl status`, and its version
//! never offered again) and invalidated.

use chrono::Utc;
use nimbus::layout::Slot;
use nimbus::slots;

use super::{Ctx, TrustView};
use crate::error::UpdateError;
use crate::state::{ChannelState, Ledger, Reports};

/// After a fallback boot: the other slot was tried and never proven.
/// Record why (mark-good's health record, when it names that slot and
/// version), never offer that version again, then invalidate the slot so
/// the same event is not seen twice. Each step is idempotent and the
/// state is saved before the GPT changes, so a crash anywhere in
/// between leads to the same result on the next start.
pub fn detect(ctx: &Ctx, trust: &TrustView, ledger: &mut Ledger) -> Result<(), UpdateError> {
    let host = &ctx.host;
    let table = host.storage.gpt(false)?.slot_table();
    let Some(&n) = slots::failed_attempts(&table, host.booted).first() else {
        return Ok(());
    };
    let label = Slot::from_partition_number(n)
        .map_or_else(|| format!("partition {n}"), |s| s.label().to_string());
    let version = ctx
        .slots(trust)
        .ok()
        .and_then(|v| v.entry(n)?.version.clone());
    let vs = version
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |v| v.to_string());
    let record_path = host.root.join(nimbus::boot::HEALTH_FAILURE_PATH);
    let record = std::fs::read(&record_path)
        .ok()
        .and_then(|b| nimbus::boot::HealthFailure::parse(&b).ok())
        .filter(|h| h.partition == n && h.version == vs);
    let (reason, at) = match &record {
        Some(h) => (
            format!("health check failed: {}", h.reason),
            chrono::DateTime::from_timestamp(h.at, 0).unwrap_or_else(Utc::now),
        ),
        None => (
            "it never reached a good health check (it crashed, hung, or failed verification before the check ran)".to_string(),
            ctx.clock.now(),
        ),
    };
    let running = ctx.running.to_string();
    tracing::warn!("rolled back: {label} ({vs}) was given up: {reason}; running {running} from the previous slot");
    let rb = crate::status::Rollback {
        failed_version: version.as_ref().map(|v| v.to_string()),
        failed_slot: label,
        reason,
        at,
        running_version: running,
    };
    if let Some(v) = &version {
        ledger.edit(|s: &mut ChannelState| s.remember_failed(v))?;
    }
    ledger.edit(|s: &mut Reports| s.rollback = Some(rb))?;
    ctx.shared
        .metric(|m| m.rollbacks = m.rollbacks.saturating_add(1));
    let mut disk = host.storage.gpt(true)?;
    disk.update_slots(|t| slots::invalidate(t, n))?;
    if record.is_some() {
        // Only after the state and the GPT carry the event.
        let _ = std::fs::remove_file(&record_path);
    }
    Ok(())
}
