//! `cargo xtask e2e`: the update loop on a real boot. Version N boots in
//! QEMU (TCG, direct kernel boot of the ESP's stage 1); its own
//! update-engine reaches a repository on the host's loopback through QEMU
//! user-mode networking (10.0.2.2), installs N+1 into USR-B, reboots by
//! itself; stage 1 selects USR-B, and the health check marks it good.
//! Every step is asserted from the serial console and from `cgpt` on the
//! disk image after the VM stopped.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::{build_image, httpd, qemu};

fn user_data(port: u16) -> String {
    format!(
        r#"#cloud-config
hostname: nimbus-e2e
coreos:
  update:
    group: stable
    server: http://10.0.2.2:{port}
    reboot-strategy: reboot
write_files:
  - path: /etc/nimbus/health.conf
    content: |
      NIMBUS_HEALTH_DELAY=2
  - path: /etc/nimbus/update-engine.env
    content: |
      NIMBUS_ENGINE_ARGS="--first-check 5 --interval 60"
"#
    )
}

fn cgpt(disk: &Path, n: u32) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for f in ["-P", "-T", "-S"] {
        let o = Command::new("cgpt")
            .args(["show", "-i", &n.to_string(), f])
            .arg(disk)
            .output()
            .context("cgpt (cargo xtask deps installs it)")?;
        out.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
    }
    Ok(out.join("/"))
}

/// Line index of the first console line matching `re`, after `from`.
fn find(console: &[&str], from: usize, re: &str) -> anyhow::Result<usize> {
    let r = regex::Regex::new(re)?;
    console
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| r.is_match(l))
        .map(|(i, _)| i)
        .with_context(|| format!("no /{re}/ on the console after line {from}"))
}

pub fn run(keep: bool) -> anyhow::Result<ExitCode> {
    let root = build_image::workspace_root();
    let work = root.join("target/nimbus/e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut steps: Vec<(String, f64)> = Vec::new();
    let mut step = |name: &str, t: Instant| {
        let s = t.elapsed().as_secs_f64();
        eprintln!("e2e: {name}: {s:.1} s");
        steps.push((name.to_string(), s));
    };

    // The port is fixed before the build: the guest's user-data names it.
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the repository server")?;
    let port = listener.local_addr()?.port();
    let ud = work.join("user-data");
    std::fs::write(&ud, user_data(port))?;

    let t = Instant::now();
    let n = work.join("1.0.0");
    let opts = build_image::prepare(build_image::parse(&[
        "--version",
        "1.0.0",
        "--formats",
        "raw",
        "--disk-size",
        "3G",
        "--user-data",
        ud.to_str().context("utf8")?,
        "--out",
        n.to_str().context("utf8")?,
    ]))?;
    build_image::build(&opts)?;
    step("build N (1.0.0)", t);

    let t = Instant::now();
    let n1 = work.join("1.1.0");
    let opts = build_image::prepare(build_image::parse(&[
        "--version",
        "1.1.0",
        "--formats",
        "raw",
        "--disk-size",
        "3G",
        "--out",
        n1.to_str().context("utf8")?,
    ]))?;
    let key_dir = opts.key_dir.clone();
    build_image::build(&opts)?;
    step("build N+1 (1.1.0)", t);

    let t = Instant::now();
    let repo = work.join("repo");
    let key = nimbus::keys::ReleaseKey::load_dir(&key_dir)?;
    let m = nimbus_image::release::publish(&nimbus_image::release::PublishOptions {
        from: &n1,
        repo: &repo,
        channel: "stable",
        key: &key,
        now: chrono::Utc::now(),
        expires_secs: 86400,
        rollout_secs: None,
        max_version: None,
    })?;
    let srv = httpd::Httpd::start_on(listener, &repo);
    step(
        &format!(
            "publish 1.1.0 on stable (serial {}) and serve it on 127.0.0.1:{port}",
            m.serial
        ),
        t,
    );

    // A free port for QEMU's ssh forward (released before QEMU binds it).
    let ssh_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let t = Instant::now();
    let disk = n.join("nimbus.raw");
    let log = work.join("console.log");
    let code = qemu::run(qemu::Qemu {
        image: Some(disk.clone()),
        uefi: false,
        serial_log: Some(log.clone()),
        timeout: 1200,
        until: Some("nimbus-mark-good: USR-B marked good".into()),
        ssh_port,
        memory: 2048,
        append: String::new(),
        mark: Vec::new(),
        quiet: true,
    })?;
    step(
        "boot 1.0.0, update itself, reboot, boot 1.1.0, mark good",
        t,
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let console: Vec<&str> = text.lines().collect();
    if code != ExitCode::SUCCESS {
        let tail = console
            .iter()
            .rev()
            .take(60)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "the VM did not reach \"USR-B marked good\" (console: {}):\n{tail}",
            log.display()
        );
    }

    // The story, in order, from the console.
    let a_sel = find(
        &console,
        0,
        r"nimbus-init: selected USR-A .*version=1\.0\.0",
    )?;
    let a_good = find(
        &console,
        a_sel,
        r"nimbus-mark-good: USR-A marked good \(version 1\.0\.0\)",
    )?;
    let b_sel = find(
        &console,
        a_good,
        r"nimbus-init: selected USR-B priority=2 tries=[01] successful=0 version=1\.1\.0",
    )?;
    let b_stage2 = find(&console, b_sel, r"stage 2: USR-B version 1\.1\.0 verified")?;
    find(
        &console,
        b_stage2,
        r"nimbus-mark-good: USR-B marked good \(version 1\.1\.0\)",
    )?;
    let gets: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .collect();
    let payload = std::fs::metadata(repo.join("payloads/1.1.0/usr.img.zst"))?.len();
    if gets.iter().map(|g| g.body_bytes).sum::<u64>() < payload {
        bail!("the guest did not download the whole payload: {gets:?}");
    }
    let (a, b) = (cgpt(&disk, 3)?, cgpt(&disk, 4)?);
    if a != "1/0/1" || b != "2/0/1" {
        bail!("after the update: USR-A {a}, USR-B {b}; expected 1/0/1 and 2/0/1");
    }
    steps.push((format!("cgpt after shutdown: USR-A {a}, USR-B {b}"), 0.0));

    println!("| step | seconds |\n|---|---|");
    for (s, secs) in &steps {
        println!("| {s} | {secs:.1} |");
    }
    println!(
        "e2e: ok: 1.0.0 -> 1.1.0 through the guest's own update-engine ({} payload request(s))",
        gets.len()
    );
    if !keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(ExitCode::SUCCESS)
}
