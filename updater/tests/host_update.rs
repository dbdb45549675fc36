//! update-engine in host mode against a real HTTP server on loopback
//! serving a repository written by the `cargo xtask release` code.

mod support;

use nimbus::layout::Slot;
use support::Fixture;

fn state_of(st: &Option<serde_json::Value>) -> String {
    st.as_ref()
        .and_then(|s| s["state"].as_str())
        .unwrap_or("")
        .to_string()
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
    let m: nimbus::release::Manifest = serde_json::from_slice(
        &std::fs::read(f.repo.join("channels/stable.json")).expect("manifest"),
    )
    .expect("parse");
    let r = support::release(&m, "1.1.0");

    let (out, st) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state_of(&st), "UPDATED_NEED_REBOOT");
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.0.0");
    assert_eq!(st["new_version"], "1.1.0");
    assert_eq!(
        f.slot_payload_sha(Slot::B, r.raw_size),
        r.raw_sha256,
        "USR-B holds exactly the payload"
    );
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
    assert_eq!(f.cgpt(Slot::A), (1, 0, 1));
    assert_eq!(
        f.partition_sha(Slot::A),
        a_before,
        "the booted slot is untouched"
    );
    let sgdisk = std::process::Command::new("sgdisk")
        .arg("-v")
        .arg(&f.disk)
        .output()
        .expect("sgdisk");
    assert!(String::from_utf8_lossy(&sgdisk.stdout).contains("No problems found"));

    // Host mode treats the slot the boot rule picks as booted: that is now
    // B (2/1/0), so pretend the host booted A by checking the staged state
    // through a second run: it must find nothing new to do.
    f.httpd.clear_log();
    let (out, st2) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let payload_gets = f
        .httpd
        .requests()
        .iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .count();
    assert_eq!(payload_gets, 0, "a second check downloads nothing");
    let st2 = st2.expect("status");
    assert!(
        st2["note"].as_str().unwrap_or("").contains("1.1.0"),
        "second check explains itself: {st2}"
    );
}

#[test]
fn air_gapped_apply_file_verifies_like_online() {
    let f = Fixture::new(3, 32);
    let m = f.manifest();
    let r = support::release(&m, "1.1.0");
    let manifest = f.repo.join("channels/stable.json");
    // Nothing may be fetched: point SERVER at nothing.
    std::fs::write(
        f.root.join(nimbus::paths::UPDATE_CONF_ETC),
        "GROUP=stable\nSERVER=disabled\n",
    )
    .expect("conf");

    // The wrong file for this manifest: refused, nothing bootable changes.
    let wrong = f.tmp.path().join("build/1.0.0/usr.img.zst");
    let out = f
        .engine(&["--json", "apply-file"])
        .arg(&wrong)
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    // The older payload is shorter than the manifest lists.
    assert_eq!(error_kind(&st), "payload-truncated");
    assert_eq!(f.cgpt(Slot::B).0, 0);

    let out = f
        .engine(&["--json", "apply-file"])
        .arg(f.payload_path())
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    assert_eq!(state_of(&st), "UPDATED_NEED_REBOOT");
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
}

#[test]
fn bad_update_conf_and_foreign_disk_are_refused_before_any_write() {
    let f = Fixture::new(3, 32);
    let a_before = f.partition_sha(Slot::A);
    for (line, key) in [
        ("IO_WRITE_BPS=fast", "IO_WRITE_BPS"),
        ("REBOOT_STRATEGY=sometimes", "REBOOT_STRATEGY"),
        (
            "REBOOT_WINDOW_START=Fri 25:00\nREBOOT_WINDOW_LENGTH=1h",
            "REBOOT_WINDOW_START",
        ),
        (
            "REBOOT_WINDOW_START=04:00\nREBOOT_WINDOW_LENGTH=forever",
            "REBOOT_WINDOW_LENGTH",
        ),
        ("ETCD_ENDPOINTS=gopher://x", "ETCD_ENDPOINTS"),
    ] {
        std::fs::write(
            f.root.join(nimbus::paths::UPDATE_CONF_ETC),
            format!("GROUP=stable\nSERVER=http://x\n{line}\n"),
        )
        .expect("conf");
        let (out, _) = f.once(&[]);
        assert_eq!(out.status.code(), Some(2), "{line}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key) && err.contains("update.conf"),
            "{line}: {err}"
        );
    }
    assert_eq!(f.partition_sha(Slot::A), a_before);
    assert_eq!(f.cgpt(Slot::B).0, 0);

    // A disk that is not a Nimbus layout: refused, left byte-identical.
    let foreign = f.tmp.path().join("foreign.raw");
    let file = std::fs::File::create(&foreign).expect("create");
    file.set_len(64 << 20).expect("len");
    let out = std::process::Command::new("sgdisk")
        .args(["-n", "1:2048:+16M", "-n", "2:0:+16M"])
        .arg(&foreign)
        .output()
        .expect("sgdisk");
    assert!(out.status.success());
    let before = std::fs::read(&foreign).expect("read");
    let out = std::process::Command::new(support::ENGINE)
        .args(["--once", "--root"])
        .arg(&f.root)
        .arg("--disk")
        .arg(&foreign)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&foreign).expect("read"), before);
}
