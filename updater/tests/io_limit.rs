//! The slot writer's bandwidth cap, measured on a real loop device: the
//! writer thread joins a cgroup v1 blkio cgroup with
//! `blkio.throttle.write_bps_device` for the loop device.

mod support;

use std::process::Command;

use nimbus::layout::Slot;
use support::Fixture;

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(file: &std::path::Path) -> Loop {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .expect("losetup (util-linux)");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn apply_rate(f: &Fixture, dev: &str, cap: &str) -> (f64, serde_json::Value) {
    std::fs::write(
        f.root.join(nimbus::paths::UPDATE_CONF_ETC),
        format!(
            "GROUP=stable\nSERVER={}\nIO_WRITE_BPS={cap}\n",
            f.httpd.url()
        ),
    )
    .expect("conf");
    let out = Command::new(support::ENGINE)
        .args(["--once", "--json", "--root"])
        .arg(&f.root)
        .args(["--disk", dev])
        .output()
        .expect("update-engine");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let a = st["last_apply"].clone();
    let rate =
        a["written"].as_f64().expect("written") / a["seconds"].as_f64().expect("seconds") / 1e6;
    (rate, a)
}

#[test]
fn five_mb_cap_holds_and_no_cap_runs_far_faster() {
    let f = Fixture::new(40, 64);
    let lo = attach(&f.disk);
    // A cap well below what this machine's disk does even on a busy day
    // (uncapped runs measured 29 MB/s on a loaded 2-core CI machine), so
    // the uncapped run shows the cap, not the disk, held the first one.
    let (capped, a) = apply_rate(&f, &lo.0, "5000000");
    eprintln!("capped: {capped:.2} MB/s ({a})");
    let how = a["io_limit"].as_str().unwrap_or("");
    assert!(
        how.contains("blkio.throttle.write_bps_device"),
        "the cgroup v1 cap was used: {how}"
    );
    assert!(a["direct_io"] == true);
    assert!(capped <= 5.5, "5 MB/s cap measured {capped:.2} MB/s");
    assert!(
        capped >= 3.5,
        "the cap should not starve the writer: {capped:.2} MB/s"
    );
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));

    // Again, uncapped: roll back to A so B is passive once more.
    let out = Command::new("cgpt")
        .args(["add", "-i", "4", "-P", "0", "-T", "0", "-S", "0"])
        .arg(&lo.0)
        .output()
        .expect("cgpt");
    assert!(out.status.success());
    let (free, a) = apply_rate(&f, &lo.0, "unlimited");
    eprintln!("uncapped: {free:.2} MB/s ({a})");
    assert!(a["io_limit"]
        .as_str()
        .unwrap_or("")
        .contains("no bandwidth cap"));
    assert!(
        free > 2.0 * capped,
        "uncapped {free:.2} MB/s should run far above the cap ({capped:.2} MB/s)"
    );
    // No writer cgroup is left behind: none named after a process that is
    // gone (another test binary's live update may have one right now).
    let leftovers: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/blkio")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.strip_prefix("nimbus-update-writer.")
                        .is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists())
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
