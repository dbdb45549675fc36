//! The whole release path on real artifacts: `cargo xtask build-image` for
//! 1.0.0 and 1.1.0, `cargo xtask release` into a repository served over
//! loopback HTTP, and update-engine (the release binary baked into the
//! image) updating the 1.0.0 disk image in host mode. USR-B then passes
//! `veritysetup verify` with the manifest's root hash.

use nimbus_testkit::httpd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nimbus_testkit::ROOTFS_EPOCH as EPOCH;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// xtask with a backstop (a cold image build takes about 3 minutes).
fn xtask(args: &[&str]) -> Output {
    nimbus_testkit::proc::output(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .env("SOURCE_DATE_EPOCH", EPOCH),
        std::time::Duration::from_secs(1200),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `cargo xtask release --from FROM --repo REPO --channel CH --key KEY EXTRA...`
fn release(from: &str, repo: &Path, channel: &str, key: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "release",
        "--from",
        from,
        "--repo",
        s(repo),
        "--channel",
        channel,
        "--key",
        key,
    ];
    args.extend_from_slice(extra);
    xtask(&args)
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn build_release_serve_update() {
    let t = tempfile::Builder::new()
        .prefix("release-update")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tmp");
    let (v1, v2) = (t.path().join("1.0.0"), t.path().join("1.1.0"));
    for (v, dir) in [("1.0.0", &v1), ("1.1.0", &v2)] {
        ok(
            xtask(&[
                "build-image",
                "--version",
                v,
                "--formats",
                "raw",
                "--disk-size",
                "3G",
                "--out",
                s(dir),
            ]),
            "build-image",
        );
    }
    let key = workspace().join("target/nimbus/dev-key");
    let repo = t.path().join("repo");

    // Bad inputs to `xtask release` first: nothing half-published.
    let o = release(s(&t.path().join("nope")), &repo, "stable", s(&key), &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("build.json"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = release(s(&v2), &repo, "Not A Channel", s(&key), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("channel name \"Not A Channel\" is not [a-z0-9._-]{1,64}"),
        "{err}"
    );
    let nokey = t.path().join("nokey");
    let o = release(s(&v2), &repo, "stable", s(&nokey), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(&format!("loading the release key from {}", nokey.display())),
        "{err}"
    );
    // Absurd rollout and lifetime: refused with what is wrong, no panic.
    for (args, want) in [
        (&["--rollout-hours", "1e12"][..], "longer than 90 days"),
        (&["--expires", "1000000000d"][..], "more than 366 days"),
        (&["--rollout-hours", "0"][..], "positive number of hours"),
    ] {
        let o = release(s(&v2), &repo, "stable", s(&key), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!repo.join("channels/stable.json").exists());

    let out = ok(
        release(s(&v2), &repo, "stable", s(&key), &["--expires", "2d"]),
        "release",
    );
    assert!(out.contains("serial 1"), "{out}");
    // Publishing again bumps the serial and keeps the payload.
    let out = ok(
        release(s(&v2), &repo, "stable", s(&key), &[]),
        "release again",
    );
    assert!(out.contains("serial 2"), "{out}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.join("channels/stable.json")).expect("manifest"),
    )
    .expect("json");
    let rel = manifest["releases"]
        .as_array()
        .expect("releases")
        .iter()
        .find(|r| r["version"] == "1.1.0")
        .expect("1.1.0")
        .clone();
    let bj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v2.join("build.json")).expect("build.json"))
            .expect("json");
    assert_eq!(rel["compressed_sha256"], bj["payload"]["compressed_sha256"]);
    assert_eq!(rel["verity_root"], bj["verity_root"]);
    // A changed payload under a published version is refused.
    let tampered = t.path().join("tampered");
    std::fs::create_dir_all(&tampered).expect("mkdir");
    std::fs::copy(v1.join("usr.img.zst"), tampered.join("usr.img.zst")).expect("copy");
    std::fs::copy(v1.join("trust.json"), tampered.join("trust.json")).expect("copy");
    let mut b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v1.join("build.json")).expect("bj")).expect("json");
    b["version"] = "1.1.0".into();
    std::fs::write(
        tampered.join("build.json"),
        serde_json::to_vec(&b).expect("json"),
    )
    .expect("write");
    let o = release(s(&tampered), &repo, "stable", s(&key), &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("immutable"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The host: the 1.0.0 image, its trusted key, a config pointing at the repo.
    let srv = httpd::Httpd::start(&repo);
    let root = nimbus_testkit::host::root(
        &t.path().join("root"),
        &std::fs::read(v1.join("trust.json")).expect("trust.json"),
        &format!(
            "GROUP=stable\nSERVER={}\nIO_WRITE_BPS=unlimited\n",
            srv.url()
        ),
    )
    .expect("host root");
    let disk = v1.join("nimbus.raw");
    let engine = workspace().join("target/release/update-engine");
    let o = Command::new(&engine)
        .args(["--once", "--json", "--root", s(&root), "--disk", s(&disk)])
        .output()
        .expect("update-engine");
    let st: serde_json::Value = serde_json::from_str(&ok(o, "update-engine")).expect("status json");
    assert_eq!(st["state"], "UPDATED_NEED_REBOOT", "{st}");
    assert_eq!(st["running_version"], "1.0.0");
    assert_eq!(st["new_version"], "1.1.0");
    assert_eq!(nimbus_testkit::cgpt::attrs(&disk, 4), (2, 1, 0));
    assert_eq!(nimbus_testkit::cgpt::attrs(&disk, 3), (1, 0, 1));
    let sg = Command::new("sgdisk")
        .args(["-v", s(&disk)])
        .output()
        .expect("sgdisk");
    assert!(String::from_utf8_lossy(&sg.stdout).contains("No problems found"));

    // USR-B: the whole slot matches what build-image wrote into USR-A of
    // the 1.1.0 image, and veritysetup accepts it with the manifest's root.
    let show: serde_json::Value = serde_json::from_str(&ok(
        xtask(&["disk", "show", s(&disk), "--json", "--keys", s(&key)]),
        "disk show",
    ))
    .expect("json");
    let b = show["partitions"]
        .as_array()
        .expect("parts")
        .iter()
        .find(|p| p["number"] == 4)
        .expect("usr-b")
        .clone();
    let desc = &b["descriptor"];
    assert_eq!(desc["signature_valid"], true, "{desc}");
    assert_eq!(desc["version"], "1.1.0");
    let first = b["first_lba"].as_u64().expect("lba");
    let last = b["last_lba"].as_u64().expect("lba");
    let usrb = t.path().join("usrb");
    let dd = Command::new("dd")
        .args([
            &format!("if={}", s(&disk)),
            &format!("of={}", s(&usrb)),
            "bs=512",
            &format!("skip={first}"),
            &format!("count={}", last - first + 1),
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(dd.success());
    let data_size = desc["data_size"].as_u64().expect("data_size");
    let v = Command::new("veritysetup")
        .args([
            "verify",
            "--no-superblock",
            "--format=1",
            "--hash=sha256",
            "--data-block-size=4096",
            "--hash-block-size=4096",
            &format!("--data-blocks={}", data_size / 4096),
            &format!("--hash-offset={}", desc["hash_offset"]),
            &format!("--salt={}", desc["verity_salt"].as_str().expect("salt")),
            s(&usrb),
            s(&usrb),
            rel["verity_root"].as_str().expect("root"),
        ])
        .output()
        .expect("veritysetup");
    assert!(
        v.status.success(),
        "veritysetup: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let bj2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v2.join("build.json")).expect("bj")).expect("json");
    let sha = Command::new("sha256sum")
        .arg(&usrb)
        .output()
        .expect("sha256sum");
    assert_eq!(
        String::from_utf8_lossy(&sha.stdout)
            .split_whitespace()
            .next()
            .unwrap_or(""),
        bj2["usr_slot_sha256"].as_str().expect("usr_slot_sha256"),
        "USR-B is bit for bit the slot build-image made for 1.1.0"
    );
}
