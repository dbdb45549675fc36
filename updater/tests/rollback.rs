//! Automatic rollback as update-engine sees it after the fallback boot:
//! the slot it staged was tried once and never proven. The disk is driven
//! the way stage 1 and mark-good drive it (the boot rule's tries decrement,
//! mark-good's health record), the engine runs in host mode against a real
//! HTTP server on loopback.

mod support;

use nimbus::gpt::Disk;
use nimbus::layout::Slot;
use nimbus::slots;
use support::Fixture;

use support::{boot_rule as boot, mark_good};

fn payload_gets(f: &Fixture) -> Vec<String> {
    f.httpd
        .requests()
        .into_iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .map(|l| l.path)
        .collect()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn failed_health_check_is_reported_blocked_and_cleaned_up() {
    let f = Fixture::new(3, 32);
    let a_before = f.partition_sha(Slot::A);

    // 1.1.0 staged into USR-B; it boots once and fails its health check.
    let (out, _) = f.once(&[]);
    ok(&out);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
    assert_eq!(boot(&f), 4, "the boot rule tries USR-B");
    let record = nimbus::boot::HealthFailure {
        partition: 4,
        partuuid: Disk::open_path(&f.disk, false)
            .expect("disk")
            .partition(4)
            .expect("part")
            .uuid,
        version: "1.1.0".into(),
        reason: "required unit broken.service is failed (result: exit-code)".into(),
        at: 1_790_000_000,
    };
    let record_path = f.root.join(nimbus::boot::HEALTH_FAILURE_PATH);
    std::fs::create_dir_all(record_path.parent().expect("dir")).expect("mkdir");
    std::fs::write(&record_path, record.to_json()).expect("record");
    // mark-good rebooted: USR-B has no tries left, the boot rule falls back.
    assert_eq!(f.cgpt(Slot::B), (2, 0, 0));
    assert_eq!(boot(&f), 3, "the fallback boot picks USR-A");

    f.httpd.clear_log();
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.0.0");
    let rb = &st["rollback"];
    assert_eq!(rb["failed_version"], "1.1.0", "{st}");
    assert_eq!(rb["failed_slot"], "USR-B");
    assert_eq!(rb["running_version"], "1.0.0");
    let reason = rb["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("health check failed") && reason.contains("broken.service"),
        "{reason}"
    );
    assert_eq!(rb["at"], "2026-09-21T14:13:20Z", "the record's time");
    let note = st["note"].as_str().unwrap_or("");
    assert!(
        note.contains("1.1.0 rolled back on this host"),
        "the same version is not offered again: {note}"
    );
    assert!(payload_gets(&f).is_empty(), "nothing downloaded");
    assert_eq!(f.cgpt(Slot::B), (0, 0, 0), "the failed slot is invalidated");
    assert_eq!(f.cgpt(Slot::A), (1, 0, 1));
    assert_eq!(f.partition_sha(Slot::A), a_before, "USR-A untouched");
    assert!(!record_path.exists(), "the record is consumed");
    assert_eq!(f.state()["failed_versions"], serde_json::json!(["1.1.0"]));
    let text = f.engine(&["--once"]).output().expect("run");
    ok(&text);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("rolled back: USR-B 1.1.0 was given up: health check failed"),
        "{text}"
    );

    // A restart still reports it, and still does not retry 1.1.0.
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["rollback"]["failed_version"], "1.1.0");
    assert!(payload_gets(&f).is_empty());
    assert_eq!(f.state()["failed_versions"], serde_json::json!(["1.1.0"]));

    // A newer release is taken; installing it clears the report.
    let v12 = support::build_version(f.tmp.path(), "1.2.0", 3, f.usr_size, &f.key);
    support::publish(&f.repo, &v12.dir, "stable", &f.key, 86400);
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["state"], "UPDATED_NEED_REBOOT", "{st}");
    assert_eq!(st["new_version"], "1.2.0");
    assert!(st["rollback"].is_null(), "{st}");
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
}

#[test]
fn unproven_slot_waits_and_a_crash_without_record_is_still_a_rollback() {
    let f = Fixture::new(3, 32);
    let (out, _) = f.once(&[]);
    ok(&out);
    assert_eq!(boot(&f), 4);
    // Running 1.1.0 from USR-B, not marked good yet; 1.2.0 appears. Writing
    // it would overwrite USR-A, the fallback: the engine waits.
    let a_before = f.partition_sha(Slot::A);
    let v12 = support::build_version(f.tmp.path(), "1.2.0", 3, f.usr_size, &f.key);
    support::publish(&f.repo, &v12.dir, "stable", &f.key, 86400);
    f.httpd.clear_log();
    // Host mode treats the slot the boot rule would pick as booted; with
    // B at 2/0/0 that is A, so give B its try back to model "B is running".
    let mut d = Disk::open_path(&f.disk, true).expect("disk");
    d.update_slots(|t| {
        let e = t.iter_mut().find(|e| e.number == 4).expect("B");
        e.attributes = slots::Prio {
            priority: 2,
            tries: 1,
            successful: false,
        }
        .apply_to(e.attributes);
        Ok(())
    })
    .expect("gpt");
    drop(d);
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.1.0");
    let note = st["note"].as_str().unwrap_or("");
    assert!(
        note.contains("1.2.0 is available") && note.contains("not marked good yet"),
        "{note}"
    );
    assert!(payload_gets(&f).is_empty());
    assert_eq!(f.partition_sha(Slot::A), a_before, "the fallback is kept");
    assert_eq!(f.cgpt(Slot::A), (1, 0, 1));

    // Marked good: now 1.2.0 goes into USR-A.
    mark_good(&f, 4);
    let (out, st) = f.once(&[]);
    ok(&out);
    assert_eq!(st.expect("status")["new_version"], "1.2.0");
    assert_eq!(f.cgpt(Slot::A), (3, 1, 0));

    // USR-A is tried and the machine never gets to the health check (no
    // record): after the fallback that is still a rollback, with a reason.
    assert_eq!(boot(&f), 3);
    assert_eq!(boot(&f), 4);
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    let rb = &st["rollback"];
    assert_eq!(rb["failed_version"], "1.2.0", "{st}");
    assert_eq!(rb["failed_slot"], "USR-A");
    assert!(
        rb["reason"]
            .as_str()
            .unwrap_or("")
            .contains("never reached a good health check"),
        "{rb}"
    );
    assert_eq!(f.cgpt(Slot::A), (0, 0, 0));
    assert_eq!(f.cgpt(Slot::B), (2, 0, 1));
}
