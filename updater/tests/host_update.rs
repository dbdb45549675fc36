//! update-engine in host mode against a real HTTP server on loopback
//! serving a repository written by the `cargo xtask release` code.

mod support;

use nimbus::layout::Slot;
use support::{httpd::Fault, Fixture};

fn state_of(st: &Option<serde_json::Value>) -> String {
    st.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("").to_string()
}

fn error_kind(st: &Option<serde_json::Value>) -> String {
    st.as_ref()
        .and_then(|s| s["last_error"]["kind"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn update_from_n_to_n_plus_1_then_nothing_new() {
    let f = Fixture::new(6, 48);
    let a_before = f.partition_sha(Slot::A);
    let m: nimbus::release::Manifest =
        serde_json::from_slice(&std::fs::read(f.repo.join("channels/stable.json")).expect("manifest")).expect("parse");
    let r = support::release(&m, "1.1.0");

    let (out, st) = f.once(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(state_of(&st), "UPDATED_NEED_REBOOT");
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.0.0");
    assert_eq!(st["new_version"], "1.1.0");
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256, "USR-B holds exactly the payload");
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
    assert_eq!(f.cgpt(Slot::A), (1, 0, 1));
    assert_eq!(f.partition_sha(Slot::A), a_before, "the booted slot is untouched");
    let sgdisk = std::process::Command::new("sgdisk").arg("-v").arg(&f.disk).output().expect("sgdisk");
    assert!(String::from_utf8_lossy(&sgdisk.stdout).contains("No problems found"));

    // Host mode treats the slot the boot rule picks as booted: that is now
    // B (2/1/0), so pretend the host booted A by checking the staged state
    // through a second run: it must find nothing new to do.
    f.httpd.clear_log();
    let (out, st2) = f.once(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let payload_gets = f.httpd.requests().iter().filter(|l| l.path.ends_with("usr.img.zst")).count();
    assert_eq!(payload_gets, 0, "a second check downloads nothing");
    let st2 = st2.expect("status");
    assert!(
        st2["note"].as_str().unwrap_or("").contains("1.1.0"),
        "second check explains itself: {st2}"
    );
}
