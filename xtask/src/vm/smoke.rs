//! `cargo xtask smoke`: the default tier's VM test, the update story at its
//! leanest, in one SeaBIOS guest life (one QEMU process across its
//! reboots; plain `-drive`, GRUB from the MBR):
//!
//! 1. 1.0.0 boots (GRUB, stage 1, verity, kexec into the slot's kernel on this first boot) and
//!    is marked good;
//!    then the stage-1 bless is tried through each state the ESP can be
//!    in (`esp_states`: not mounted, automount, /boot read-write,
//!    read-only here, read-only in another mount namespace);
//! 2. 1.1.0 is published on its channel: the guest's update-engine fetches
//!    it by delta (Range requests for pack frames only), writes USR-B,
//!    reboots into it (stage 1 goes on as its stage 2 in its own kernel:
//!    the slot boots the same kernel and initramfs, so no kexec), and it is
//!    marked good;
//! 3. 1.2.0 is published, and its health check fails (a unit the health
//!    check requires fails on 1.2.0 only): the guest falls back to 1.1.0 by
//!    itself and `updatectl status` says why;
//! 4. then, in one more boot, USR-A is corrupted under its verity tree and
//!    made the first choice: stage 1's dm-verity refuses it and USR-B boots.
//!
//! The three images are plain builds (`--formats raw`), shared through the
//! image cache with the other tests that build the same versions; what is
//! particular to this story (the update server, the health check's unit,
//! ssh's key) travels as user-data through fw_cfg.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::httpd;
use crate::vm::e2e::{build, cgpt, expect, good_boot, Ssh, Steps};
use crate::vm::qemu;

#[derive(Args)]
pub struct Smoke {
    /// Keep target/nimbus/smoke afterwards (images, repository, console).
    #[arg(long)]
    keep: bool,
}

/// The unit the health check requires in the test harnesses' user-data
/// (smoke and cluster); it fails on [`BROKEN_VERSION`] and nowhere else, so
/// "a release whose health check fails" is a plain build of that version,
/// shared through the image cache, not an image of its own.
pub(crate) const CANARY: &str = "nimbus-test-canary.service";
pub(crate) const BROKEN_VERSION: &str = "1.2.0";

/// `coreos.units` list entry for [`CANARY`], indented for `  units:`.
/// (`$$` is systemd's escape for a shell's `$`.)
pub(crate) fn canary_unit() -> String {
    format!(
        r#"    - name: {CANARY}
      command: start
      content: |
        [Unit]
        Description=test: a service the health check requires, broken in {BROKEN_VERSION}
        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/bin/sh -c '. /usr/lib/os-release; if [ "$$VERSION_ID" = {BROKEN_VERSION} ]; then echo "{CANARY}: failing on purpose on $$VERSION_ID" > /dev/console; exit 1; fi'
        [Install]
        WantedBy=multi-user.target
"#
    )
}

/// health.conf's line that makes [`CANARY`] required.
pub(crate) fn canary_health_units() -> String {
    format!("NIMBUS_HEALTH_UNITS=update-engine.service {CANARY}")
}

fn user_data(port: u16, ssh_key: &str) -> String {
    format!(
        r#"#cloud-config
hostname: nimbus-smoke
users:
  - name: root
    ssh_authorized_keys:
      - {ssh_key}
coreos:
  update:
    group: stable
    server: http://10.0.2.2:{port}
    reboot-strategy: reboot
  units:
{canary}write_files:
  # Uncapped writes: this story is about what gets installed (the cap is
  # measured by `cargo xtask bench impact`).
  - path: /etc/nimbus/update.conf
    content: |
      IO_WRITE_BPS=0
  - path: /etc/nimbus/health.conf
    content: |
      NIMBUS_HEALTH_DELAY=2
      {health_units}
  - path: /etc/nimbus/update-engine.env
    content: |
      NIMBUS_ENGINE_ARGS="--first-check 5 --interval 5 --reboot-poll 5"
"#,
        canary = canary_unit(),
        health_units = canary_health_units(),
    )
}

pub fn run(a: Smoke) -> anyhow::Result<ExitCode> {
    let root = crate::build_image::workspace_root();
    let work = root.join("target/nimbus/smoke");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let r = story(&work);
    if let Err(e) = &r {
        eprintln!("smoke: failed: {e:#}");
    }
    r?;
    if !a.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes fetched for `v`'s payload, if it all came as bounded Range
/// requests on the pack (a delta) and was less than half the payload.
fn delta_share(srv: &httpd::Httpd, repo: &Path, v: &str) -> anyhow::Result<String> {
    let gets: Vec<httpd::Logged> = srv
        .requests()
        .into_iter()
        .filter(|l| {
            l.path.ends_with(&format!("payloads/{v}/usr.img.zst"))
                || l.path.ends_with(&format!("payloads/{v}/usr.pack"))
        })
        .collect();
    let payload = std::fs::metadata(repo.join(format!("payloads/{v}/usr.img.zst")))?.len();
    let full = gets
        .iter()
        .filter(|l| l.path.ends_with("usr.img.zst"))
        .count();
    let ranged = gets
        .iter()
        .all(|l| l.status == 206 && l.range_end.is_some());
    let got: u64 = gets.iter().map(|l| l.body_bytes).sum();
    if gets.is_empty() || full > 0 || !ranged || got.saturating_mul(2) > payload {
        bail!(
            "{v} did not come by delta: {} request(s), {full} of the full payload, {got} of {payload} bytes",
            gets.len()
        );
    }
    Ok(format!(
        "{got} bytes, {:.2} % of the payload, in {} Range request(s)",
        got as f64 * 100.0 / payload as f64,
        gets.len()
    ))
}

fn story(work: &Path) -> anyhow::Result<()> {
    let mut steps = Steps::new("smoke");
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the repository server")?;
    let port = listener.local_addr()?.port();
    let key = work.join("id_ed25519");
    let st = nimbus_testkit::proc::status(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "nimbus-smoke", "-f"])
            .arg(&key),
        Duration::from_secs(30),
    )
    .context("ssh-keygen (openssh-client)")?;
    if !st.success() {
        bail!("ssh-keygen failed ({st})");
    }
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
    let ud = work.join("user-data");
    std::fs::write(&ud, user_data(port, pubkey.trim()))?;

    let (n0, opts) = build(work, "1.0.0", &[])?;
    let (n1, _) = build(work, "1.1.0", &[])?;
    let (n2, _) = build(work, "1.2.0", &[])?;
    steps.done("images 1.0.0, 1.1.0, 1.2.0 (from the image cache when built before)");

    let repo = work.join("repo");
    let signer = nimbus::keys::ReleaseKey::load_dir(&opts.key_dirs[0])?;
    let publish = |from: &Path| {
        nimbus_image::release::publish(&nimbus_image::release::PublishOptions {
            from,
            repo: &repo,
            channel: "stable",
            keys: &[&signer],
            rotation: None,
            now: chrono::Utc::now(),
            expires_secs: 86400,
            rollout_secs: None,
            max_version: None,
            clear_max_version: false,
        })
    };
    publish(&n0)?;
    let srv = httpd::Httpd::start_on(listener, &repo);

    let disk = n0.join("nimbus.raw");
    let ssh = Ssh::new(
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        key.clone(),
    );
    let log = work.join("console.log");
    let vm_opts = qemu::Qemu {
        // The whole story, reboots included, is bounded; each boot stage
        // has its own deadline besides.
        timeout: 1500,
        user_data: Some(ud.clone()),
        ..qemu::Qemu::harness(&disk, &log, ssh.port)
    };
    let long = Duration::from_secs(600);
    let mut vm = qemu::Vm::spawn(&vm_opts)?;
    let mut first = vec![
        r"Nimbus: BIOS boot, stage 1 copy a from ESP".to_string(),
        r"nimbus-init: first boot of /dev/vda: new disk GUID".into(),
    ];
    // The first boot gave the disk new GUIDs, which only a new kernel sees:
    // stage 1 kexecs. Every later boot runs the slot's stage 2 in stage 1's
    // own kernel (the same kernel and initramfs: no kexec).
    first.extend(with_hand_over(
        good_boot("USR-A", "1.0.0", 1),
        "USR-A",
        false,
    ));
    let i = expect(&mut vm, 0, &first)?;
    // The services baked into USR, asked of systemd itself (the serial
    // console carries only part of systemd's status lines).
    // Docker is socket-activated and etcd runs only where configured (this
    // host's cloud-config configures neither): idle, neither runs.
    let units = [
        "update-engine.service",
        "docker.socket",
        "docker.service",
        "containerd.service",
        nimbus::units::ETCD,
    ];
    let want = ["active", "active", "inactive", "inactive", "inactive"];
    let o = ssh.run(&format!("systemctl is-active {}", units.join(" ")))?;
    let states = String::from_utf8_lossy(&o.stdout).into_owned();
    if states.split_whitespace().collect::<Vec<_>>() != want {
        let journal = ssh
            .run(&format!(
                "journalctl -b --no-pager -n 60 -u {}",
                units.join(" -u ")
            ))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        bail!("{units:?} should be {want:?}, are {states:?}\n{journal}");
    }
    // The first `docker` call starts dockerd (and containerd) through the
    // socket: an image loaded from a local archive runs.
    let image = crate::vm::cluster::web_image(work)?;
    let o = ssh.run_from(
        "docker load -q && docker run --rm --entrypoint /bin/busybox nimbus/web:1 echo ran-in-a-container && systemctl is-active docker.service containerd.service",
        std::fs::File::open(&image)
            .with_context(|| image.display().to_string())?
            .into(),
        Duration::from_secs(300),
    )?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success()
        || !out.contains("ran-in-a-container")
        || out.lines().filter(|l| l.trim() == "active").count() != 2
    {
        bail!(
            "docker run through the socket failed ({}): {out}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The shutdown hook takes links down (checked in a network namespace
    // of its own: here it would cut ssh).
    let o = ssh.run(
        "unshare -n sh -c 'ip link add q0 type dummy && ip link set q0 up && \
         ip -o link show q0 | grep -q \",UP\" && \
         /usr/lib/systemd/system-shutdown/nimbus-quiesce-net reboot && \
         ! ip -o link show q0 | grep -q \",UP\"' && echo quiesced",
    )?;
    if !String::from_utf8_lossy(&o.stdout).contains("quiesced") {
        bail!(
            "the system-shutdown hook left a link up: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A host name no file lists resolves (nss-myhostname), so sudo on a
    // host Vagrant or cloud-config renamed does not complain; tried in a
    // UTS namespace of its own, the host keeps its name.
    let o = ssh.run("unshare -u sh -c 'hostname core-renamed && getent hosts core-renamed'")?;
    if !o.status.success() || !String::from_utf8_lossy(&o.stdout).contains("core-renamed") {
        bail!(
            "a new host name does not resolve ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    steps.done("1.0.0 boots under SeaBIOS (GRUB, stage 1, verity, kexec on this first boot), is marked good; update-engine active, etcd, dockerd and containerd not running until asked; `docker run` of a loaded image starts them through docker.socket; the shutdown hook takes links down; a new host name resolves");

    let rows = crate::vm::esp_states::run(&ssh)?;
    steps.done(&format!(
        "stage 1 blessed through each state of the ESP: {}",
        rows.join("; ")
    ));

    publish(&n1)?;
    let i = expect(
        &mut vm,
        i,
        &with_hand_over(good_boot("USR-B", "1.1.0", 0), "USR-B", true),
    )?;
    let share = delta_share(&srv, &repo, "1.1.0")?;
    steps.done(&format!(
        "1.1.0 published; the guest installs it by delta ({share}), reboots into USR-B (its stage 2 in stage 1's kernel, no kexec), marks it good"
    ));

    publish(&n2)?;
    let i = expect(
        &mut vm,
        i,
        &[
            r"nimbus-init: selected USR-A .*version=1\.2\.0".to_string(),
            format!(
                r"nimbus-mark-good: health check failed on USR-A \(version 1\.2\.0\): required unit {}",
                regex::escape(CANARY)
            ),
            r"nimbus-mark-good: USR-A has no tries left: rebooting to fall back to USR-B".into(),
            r"nimbus-init: selected USR-B .*version=1\.1\.0".into(),
        ],
    )?;
    vm.wait_for(r"stage 2: USR-B version 1\.1\.0 verified", i, long)?;
    // update-engine reports the rollback once it has started after it.
    let t0 = Instant::now();
    let status = loop {
        let o = ssh.run("updatectl status")?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text.contains("1.2.0 was given up") || t0.elapsed() > Duration::from_secs(300) {
            break text;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    for want in [
        "1.2.0 was given up",
        &format!("health check failed: required unit {CANARY} is failed"),
        "back on 1.1.0",
        "running:   1.1.0",
    ] {
        if !status.contains(want) {
            bail!("`updatectl status` after the rollback lacks {want:?}:\n{status}");
        }
    }
    vm.stop();
    steps.done("1.2.0 fails its health check, the guest falls back to 1.1.0 by itself, `updatectl status` says why");

    // USR-A (1.2.0, given up) corrupted under its verity tree: the erofs
    // superblock at byte 1024 of the slot. Made the first choice by hand.
    let d = nimbus::gpt::Disk::open_path(&disk, false)?;
    let a_off = d.partition(3)?.offset_bytes();
    drop(d);
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)?;
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(a_off + 1024))?;
        f.read_exact(&mut b)?;
        b[0] ^= 0xff;
        f.seek(SeekFrom::Start(a_off + 1024))?;
        f.write_all(&b)?;
        f.sync_all()?;
    }
    let st = Command::new("cgpt")
        .args(["add", "-i", "3", "-P", "15", "-T", "1", "-S", "0"])
        .arg(&disk)
        .status()
        .context("cgpt (cargo xtask deps installs it)")?;
    if !st.success() {
        bail!("cgpt add -i 3 failed ({st})");
    }
    let mut vm = qemu::Vm::spawn(&vm_opts)?;
    let i = expect(
        &mut vm,
        0,
        &[
            r"nimbus-init: refusing USR-A".to_string(),
            r"nimbus-init: selected USR-B .*version=1\.1\.0".into(),
            r"nimbus-init: stage 1 done".into(),
        ],
    )?;
    let _ = i;
    vm.stop();
    let console = std::fs::read_to_string(&log)?;
    if !console.contains("dm-verity rejected the data") {
        bail!("stage 1 refused USR-A, but not for dm-verity:\n{console}");
    }
    let (a, b) = (cgpt(&disk, 3)?, cgpt(&disk, 4)?);
    if a != "15/0/0" || !b.ends_with("/0/1") {
        bail!("after the story: USR-A {a}, USR-B {b}; expected 15/0/0 (its try spent) and B still successful");
    }
    steps.done("USR-A corrupted and made first: dm-verity refuses it, USR-B (1.1.0) boots");

    print!("{}", steps.table());
    println!(
        "smoke: ok: 1.0.0 -> 1.1.0 (delta) -> 1.2.0 rolled back -> corrupted USR-A refused; cgpt USR-A {a}, USR-B {b}"
    );
    Ok(())
}

/// `good_boot`'s patterns with stage 1's hand-over line after the
/// selection: kexec into the slot's kernel, or (`in_place`) its stage 2 in
/// stage 1's own kernel.
fn with_hand_over(mut boot: Vec<String>, slot: &str, in_place: bool) -> Vec<String> {
    use nimbus::boot::{HANDED_IN_PLACE, HANDED_TO_KEXEC, STAGE1_DONE};
    let done = regex::escape(STAGE1_DONE);
    let how = if in_place {
        format!(
            r"{done} \d+ ms; {slot} boots this very kernel and initramfs .*{}",
            regex::escape(HANDED_IN_PLACE)
        )
    } else {
        format!(r"{done} \d+ ms; {} {slot}", regex::escape(HANDED_TO_KEXEC))
    };
    boot.insert(1, how);
    boot
}
