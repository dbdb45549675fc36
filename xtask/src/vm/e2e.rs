//! `cargo xtask e2e`: the update loop on real boots, in one VM (QEMU TCG,
//! direct kernel boot of the ESP's stage 1). The guest reaches a repository
//! on the host's loopback only through QEMU user-mode networking (10.0.2.2).
//!
//! 1. 1.0.0 boots; `stable` offers 1.0.0 itself (nothing to install) and
//!    trust set 2.
//! 2. `updatectl channel beta` in the guest; the engine follows the channel
//!    to 1.3.0, installs it into USR-B, reboots, marks it good.
//!
//! N -> N+1 on `stable` by the guest's own update-engine, with SeaBIOS
//! reboots and the delta, is the cluster's rolling update
//! (`cargo xtask cluster`); a release whose health check fails, the
//! fallback it causes and what `updatectl status` says of it are its
//! bad-health fault. This story keeps to what only one host shows.
//!
//! Keys rotate along the way (docs/security.md): stable is published with
//! trust set 2, which adds key 2 (signed by keys 1 and 2); 1.3.0 is signed
//! by key 2 alone and published with trust set 3, which removes key 1.
//! Stage 1 boots 1.3.0 under set 2 (from the ESP), then gets set 3. A
//! manifest signed by key 1 is refused by update-engine, `updatectl
//! rollback` to the key-1 slot is refused, and that slot made bootable by
//! hand (cgpt, VM stopped) is refused by stage 1, which boots 1.3.0.
//!
//! Stage 1 updates itself: 1.3.0's stage 1 differs (it carries set 2), so
//! update-engine installs it into the ESP's copy b; GRUB tries it once, it
//! boots 1.3.0, mark-good makes it the default. 1.4.0 is released (on
//! stable, which cloud-config's user-data sets again at each boot) with a
//! stage 1 that cannot start (an initramfs without /init: the kernel
//! panics and, with panic=-1, resets): GRUB's one try of copy a fails, it
//! goes back to copy b, which boots 1.4.0; `updatectl status` reports the
//! stage 1 given up.
//!
//! Every step is asserted from the serial console, and the slot table from
//! `cgpt` on the disk image after the VM stopped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::vm::qemu;
use crate::{build_image, httpd};

fn user_data(port: u16, ssh_key: &str) -> String {
    format!(
        r#"#cloud-config
hostname: nimbus-e2e
users:
  - name: root
    ssh_authorized_keys:
      - {ssh_key}
coreos:
  update:
    group: stable
    server: http://10.0.2.2:{port}
    reboot-strategy: reboot
write_files:
  # The story is about what gets installed, not how gently: writes
  # uncapped (the default cap, 16 MB/s, is measured by `bench impact`).
  # cloud-config merges coreos.update's keys into this file after it.
  - path: /etc/nimbus/update.conf
    content: |
      IO_WRITE_BPS=0
  - path: /etc/nimbus/health.conf
    content: |
      NIMBUS_HEALTH_DELAY=2
  - path: /etc/nimbus/update-engine.env
    content: |
      NIMBUS_ENGINE_ARGS="--first-check 5 --interval 15"
"#
    )
}

pub(crate) fn cgpt(disk: &Path, n: u32) -> anyhow::Result<String> {
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

/// How long one ssh command may take by default (`Ssh::run_within` sets
/// another): the longest ordinary command in the harnesses (a drain, an
/// `updatectl update --wait` use their own).
pub const SSH_LIMIT: Duration = Duration::from_secs(180);

pub(crate) struct Ssh {
    pub port: u16,
    pub key: PathBuf,
    /// Commands share one connection to the guest (see `multiplexed`).
    pub mux: Option<Mux>,
}

/// An ssh master connection that later commands ride on (ControlPath).
/// A fresh connection costs a busy TCG guest seconds of CPU (sshd's
/// re-exec, key exchange, PAM); a channel on a live one costs a fork.
pub(crate) struct Mux {
    path: PathBuf,
    master: std::sync::Mutex<Option<(std::process::Child, Instant)>>,
}

impl Drop for Mux {
    fn drop(&mut self) {
        if let Ok(mut m) = self.master.lock() {
            if let Some((mut c, _)) = m.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Ssh {
    pub fn new(port: u16, key: PathBuf) -> Ssh {
        Ssh {
            port,
            key,
            mux: None,
        }
    }

    /// Like `new`, with a master connection kept at `path` (a socket; its
    /// directory must be private). Commands fall back to their own
    /// connection while there is no live master.
    pub fn multiplexed(port: u16, key: PathBuf, path: PathBuf) -> Ssh {
        // sun_path holds 108 bytes; a deeper checkout goes without.
        let fits = path.as_os_str().len() < 100;
        Ssh {
            port,
            key,
            mux: fits.then(|| Mux {
                path,
                master: std::sync::Mutex::new(None),
            }),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                // A guest that hangs or reboots mid-command: the
                // connection is given up after 15 s of silence.
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "ServerAliveCountMax=3",
                "-o",
                "LogLevel=ERROR",
            ]);
        c
    }

    /// Start the master if there is none (or it died: the guest rebooted
    /// or was killed), at most every 5 s.
    fn ensure_master(&self, m: &Mux) {
        let Ok(mut slot) = m.master.lock() else {
            return;
        };
        if let Some((c, at)) = slot.as_mut() {
            let alive = matches!(c.try_wait(), Ok(None));
            if alive || at.elapsed() < Duration::from_secs(5) {
                return;
            }
        }
        // A master killed with its guest leaves its socket behind, and a
        // new master would refuse to replace it.
        let _ = std::fs::remove_file(&m.path);
        let spawned = self
            .command()
            .arg("-o")
            .arg(format!("ControlPath={}", m.path.display()))
            .args([
                "-o",
                "ControlMaster=yes",
                // A guest that reboots under the master: it gives up
                // after ~6 s instead of holding its riders.
                "-o",
                "ServerAliveInterval=2",
                "-o",
                "ServerAliveCountMax=3",
                "-N",
                "root@127.0.0.1",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        *slot = spawned.ok().map(|c| (c, Instant::now()));
    }

    /// Run `cmd` in the guest, killed after [`SSH_LIMIT`].
    pub fn run(&self, cmd: &str) -> anyhow::Result<Output> {
        self.run_within(cmd, SSH_LIMIT)
    }

    /// Run `cmd` in the guest; ssh is killed after `limit` (a guest that
    /// keeps the connection alive but never finishes the command).
    pub fn run_within(&self, cmd: &str, limit: Duration) -> anyhow::Result<Output> {
        self.run_from(cmd, std::process::Stdio::null(), limit)
    }

    /// Run `cmd` in the guest with `stdin` as its input (a file to load,
    /// say); ssh is killed after `limit`.
    pub fn run_from(
        &self,
        cmd: &str,
        stdin: std::process::Stdio,
        limit: Duration,
    ) -> anyhow::Result<Output> {
        let mut c = self.command();
        if let Some(m) = &self.mux {
            self.ensure_master(m);
            // No live master (not up yet): ssh connects on its own.
            c.arg("-o")
                .arg(format!("ControlPath={}", m.path.display()))
                .args(["-o", "ControlMaster=no"]);
        }
        c.args(["root@127.0.0.1", cmd]);
        nimbus_testkit::proc::output_from(&mut c, stdin, limit).context("ssh to the guest")
    }

    /// Run `cmd` once sshd answers (it may still be starting); its stdout.
    pub fn run_ok(&self, cmd: &str, patience: Duration) -> anyhow::Result<String> {
        let t0 = Instant::now();
        loop {
            let o = self.run(cmd)?;
            // 255: ssh itself failed (not up yet); anything else is the command's.
            if o.status.code() != Some(255) {
                if !o.status.success() {
                    bail!(
                        "in the guest: {cmd}: {}\n{}{}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
            }
            if t0.elapsed() > patience {
                bail!(
                    "ssh to the guest failed for {} s: {}",
                    patience.as_secs(),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }
}

/// Build `version` into `work/<version>` (raw image, 3 GiB) with extra
/// build-image flags; the bench uses it too.
pub fn build(
    work: &Path,
    version: &str,
    extra: &[&str],
) -> anyhow::Result<(PathBuf, nimbus_image::pipeline::BuildOptions)> {
    let out = work.join(version);
    let mut args = vec![
        "--version",
        version,
        "--formats",
        "raw",
        "--disk-size",
        "3G",
        "--out",
        out.to_str().context("utf8")?,
    ];
    // The tests' epoch unless the caller set one: the harness commands
    // (e2e, cluster) then share the image cache with the VM tier, rather
    // than building a new root filesystem for every commit.
    if std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
        args.extend_from_slice(&["--epoch", nimbus_testkit::ROOTFS_EPOCH]);
    }
    args.extend_from_slice(extra);
    let opts = build_image::prepare(build_image::parse(&args))?;
    build_image::build(&opts)?;
    Ok((out, opts))
}

pub(crate) fn marked_good(slot: &str, version: &str) -> String {
    format!(
        r"nimbus-mark-good: {slot} marked good \(version {}\)",
        regex::escape(version)
    )
}

/// The console lines of a boot into `slot` that ends marked good:
/// selection (tries spent, `successful` as it was), stage 2, mark-good.
pub(crate) fn good_boot(slot: &str, version: &str, successful: u8) -> Vec<String> {
    let v = regex::escape(version);
    vec![
        format!(
            r"nimbus-init: selected {slot} priority=\d+ tries=0 successful={successful} version={v}"
        ),
        format!(r"stage 2: {slot} version {v} verified"),
        marked_good(slot, version),
    ]
}

/// Wait for each pattern in order; the line index of the last.
pub(crate) fn expect(vm: &mut qemu::Vm, mut from: usize, res: &[String]) -> anyhow::Result<usize> {
    for re in res {
        from = vm.wait_for(re, from, Duration::from_secs(600))?;
    }
    Ok(from)
}

/// A story's steps and how long each took, for its closing table.
pub(crate) struct Steps {
    who: &'static str,
    pub rows: Vec<(String, f64)>,
    t: Instant,
}

impl Steps {
    pub fn new(who: &'static str) -> Steps {
        Steps {
            who,
            rows: Vec::new(),
            t: Instant::now(),
        }
    }

    pub fn done(&mut self, name: &str) {
        let s = self.t.elapsed().as_secs_f64();
        eprintln!("{}: {name}: {s:.1} s", self.who);
        self.rows.push((name.to_string(), s));
        self.t = Instant::now();
    }

    /// The steps as a Markdown table.
    pub fn table(&self) -> String {
        let mut table = String::from("| step | seconds |\n|---|---|\n");
        for (s, secs) in &self.rows {
            table.push_str(&format!("| {s} | {secs:.1} |\n"));
        }
        table
    }
}

pub fn run(keep: bool) -> anyhow::Result<ExitCode> {
    let root = build_image::workspace_root();
    let work = root.join("target/nimbus/e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let log = work.join("console.log");
    let r = story(&work, &log);
    if let Err(e) = &r {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        eprintln!(
            "e2e: failed: {e:#}\nconsole ({}), last lines:\n{tail}",
            log.display()
        );
    }
    r?;
    if !keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(ExitCode::SUCCESS)
}

fn story(work: &Path, log: &Path) -> anyhow::Result<()> {
    let mut steps = Steps::new("e2e");

    // The port is fixed before the build: the guest's user-data names it.
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the repository server")?;
    let port = listener.local_addr()?.port();
    let key = work.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nimbus-e2e", "-f"])
        .arg(&key)
        .status()
        .context("ssh-keygen (openssh-client)")?;
    if !st.success() {
        bail!("ssh-keygen failed ({st})");
    }
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
    let ud = work.join("user-data");
    std::fs::write(&ud, user_data(port, pubkey.trim()))?;

    let (n, opts) = build(
        work,
        "1.0.0",
        &["--user-data", ud.to_str().context("utf8")?],
    )?;
    steps.done("build N (1.0.0)");

    let repo = work.join("repo");
    let key = nimbus::keys::ReleaseKey::load_dir(&opts.key_dirs[0])?;
    let key2_dir = work.join("key2");
    let key2 = nimbus::keys::ReleaseKey::generate()?;
    key2.write_to_dir(&key2_dir)?;
    let publish = |from: &Path,
                   channel: &str,
                   keys: &[&nimbus::keys::ReleaseKey],
                   rotation: Option<nimbus_image::release::Rotation>| {
        nimbus_image::release::publish(&nimbus_image::release::PublishOptions {
            from,
            repo: &repo,
            channel,
            keys,
            rotation,
            now: chrono::Utc::now(),
            expires_secs: 86400,
            rollout_secs: None,
            max_version: None,
            clear_max_version: false,
        })
    };
    publish(
        &n,
        "stable",
        &[&key, &key2],
        Some(nimbus_image::release::Rotation {
            add: vec![key2.public()],
            ..Default::default()
        }),
    )?;
    let srv = httpd::Httpd::start_on(listener, &repo);
    steps.done(&format!(
        "publish 1.0.0 on stable with trust set 2 (adds key 2); serve on 127.0.0.1:{port}"
    ));
    let trust2 = repo.join("trust/2.json");
    let (n3, _) = build(
        work,
        "1.3.0",
        &[
            "--key",
            key2_dir.to_str().context("utf8")?,
            "--trust",
            trust2.to_str().context("utf8")?,
        ],
    )?;
    steps.done("build 1.3.0 (for channel beta), signed by key 2 alone, carrying trust set 2");
    let (n4, _) = build(
        work,
        "1.4.0",
        &[
            "--key",
            key2_dir.to_str().context("utf8")?,
            "--trust",
            trust2.to_str().context("utf8")?,
        ],
    )?;
    // The test hook: a stage 1 that cannot start (no /init in it).
    let empty = nimbus_image::cpio::Cpio::new(Vec::new(), 0).finish()?;
    std::fs::write(n4.join("stage1/stage1.img"), empty)?;
    steps.done("build 1.4.0, its stage 1 replaced by an initramfs without /init");

    // A free port for QEMU's ssh forward (released before QEMU binds it).
    let ssh = Ssh::new(
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        work.join("id_ed25519"),
    );
    let disk = n.join("nimbus.raw");
    // A pristine copy of the same image attached as the guest's first disk
    // (/dev/vda; the host's own is vdb): same USR PARTUUIDs, same ESP.
    // Stage 1, mark-good and update-engine must keep to the boot disk.
    let pristine = work.join("pristine.raw");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&disk)
        .arg(&pristine)
        .status()?;
    if !st.success() {
        bail!("cp {} {}", disk.display(), pristine.display());
    }
    let pristine_sha = nimbus_image::sha256_file(&pristine)?;
    let vm_opts = |extra_disk: Vec<PathBuf>| qemu::Qemu {
        extra_disk,
        ..qemu::Qemu::harness(&disk, log, ssh.port)
    };
    // The host's first boot, alone: its disk gets its own GUIDs. (At the
    // very first boot two byte-identical disks cannot be told apart, and
    // stage 1 refuses to guess: docs/boot.md.)
    let mut vm = qemu::Vm::spawn(&vm_opts(Vec::new()))?;
    vm.wait_for(
        r"nimbus-init: first boot of /dev/vda: new disk GUID",
        0,
        Duration::from_secs(300),
    )?;
    vm.wait_for(r"nimbus-init: stage 1 done", 0, Duration::from_secs(300))?;
    vm.stop();
    steps.done("first boot of the host's disk alone (stage 1: its own GUIDs)");
    let mut vm = qemu::Vm::spawn(&vm_opts(vec![pristine.clone()]))?;
    steps.done("a pristine copy of 1.0.0 attached as the first disk");
    let long = Duration::from_secs(600);

    // 1: N boots from the second disk; stable offers nothing newer.
    let i = expect(
        &mut vm,
        0,
        &[
            r"nimbus-init: boot disk /dev/vdb ".into(),
            r"nimbus-init: selected USR-A .*version=1\.0\.0".into(),
            marked_good("USR-A", "1.0.0"),
        ],
    )?;
    steps.done("boot 1.0.0 from the second disk, USR-A marked good");
    let said = crate::vm::toolbox::check(&ssh)?;
    steps.done(&said);

    // Every GET of a version's payload or pack (the guest updates by
    // delta: Range requests for the frames it lacks).
    let payload_gets = |v: &str| -> Vec<httpd::Logged> {
        srv.requests()
            .into_iter()
            .filter(|l| {
                l.path.ends_with(&format!("payloads/{v}/usr.img.zst"))
                    || l.path.ends_with(&format!("payloads/{v}/usr.pack"))
            })
            .collect()
    };

    // 2: channel switch inside the guest, followed to the beta release,
    // which is signed by key 2 alone and removes key 1.
    publish(
        &n3,
        "beta",
        &[&key2],
        Some(nimbus_image::release::Rotation {
            remove: vec![key.id],
            ..Default::default()
        }),
    )?;
    let out = ssh.run_ok("updatectl channel beta | tee /dev/console", long)?;
    if !out.contains("switched to beta; it offers 1.3.0") {
        bail!("updatectl channel beta: {out}");
    }
    let i = vm.wait_for(r"switched to beta; it offers 1\.3\.0", i, long)?;
    // 1.3.0's stage 1 went into copy b; GRUB tries it once. It boots a
    // slot signed by key 2 alone (set 2: built in, and on the ESP).
    let i = vm.wait_for(r"Nimbus: BIOS boot, stage 1 copy b from ESP", i, long)?;
    let i = vm.wait_for(
        r"nimbus-init: trust set version 2, 1 of 2 key\(s\)",
        i,
        long,
    )?;
    let i = expect(&mut vm, i, &good_boot("USR-B", "1.3.0", 0))?;
    let i = vm.wait_for(
        r"nimbus-mark-good: stage 1 copy b is now the default of both loaders",
        i,
        long,
    )?;
    steps.done("`updatectl channel beta` in the guest; 1.3.0 (key 2 only) and its stage 1 (ESP copy b) installed, booted under trust set 2, marked good, copy b blessed");

    // 3: key 1 is no longer trusted anywhere.
    let k2 = key2.id.to_string();
    let t0 = Instant::now();
    let trust = loop {
        let t: serde_json::Value =
            serde_json::from_str(&ssh.run_ok("updatectl trust --json", long)?)?;
        if t["esp_version"] == 3 || t0.elapsed() > Duration::from_secs(120) {
            break t;
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    if trust["usr"]["version"] != 3
        || trust["usr"]["keys"] != serde_json::json!([k2])
        || trust["active_version"] != 3
        || trust["esp_version"] != 3
        || trust["stage1"]["version"] != 2
    {
        bail!("updatectl trust --json after 1.3.0 was marked good: {trust}");
    }
    let shown = ssh.run_ok("updatectl trust | tee /dev/console", long)?;
    if !shown.contains(&format!(
        "update-engine: trust set version 3, 1 of 1 key(s): {k2}"
    )) {
        bail!("updatectl trust:\n{shown}");
    }
    vm.wait_for(r"stage 1: +trust set version 2, 1 of 2 key\(s\)", i, long)?;
    // A manifest signed by key 1 alone, on the channel the guest follows
    // now (stable: cloud-config's user-data sets it again at each boot).
    let mpath = repo.join(nimbus::repo::manifest_rel("stable"));
    let good_manifest = (
        std::fs::read(&mpath)?,
        std::fs::read(nimbus::repo::sig_path(&mpath))?,
    );
    let mut m: nimbus::release::Manifest = serde_json::from_slice(&std::fs::read(&mpath)?)?;
    m.serial += 1;
    m.releases.push(nimbus::release::Release {
        version: "1.4.0".parse()?,
        ..m.releases[0].clone()
    });
    let bytes = serde_json::to_vec_pretty(&m)?;
    std::fs::write(&mpath, &bytes)?;
    std::fs::write(
        nimbus::repo::sig_path(&mpath),
        serde_json::to_vec(&nimbus::release::Manifest::sign_bytes(&bytes, &[&key]))?,
    )?;
    let o = ssh.run("updatectl check")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.code() != Some(4) || !said.contains("is not trusted") {
        bail!(
            "updatectl check of a manifest signed by the removed key: {:?}: {said}",
            o.status
        );
    }
    let o = ssh.run("updatectl rollback")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() || !said.contains("no valid descriptor under trust set version 3") {
        bail!(
            "updatectl rollback to the key-1 slot: {:?}: {said}",
            o.status
        );
    }
    steps.done("update-engine refuses a manifest signed by the removed key 1, and a rollback to the key-1 slot");
    vm.stop();
    std::fs::write(&mpath, &good_manifest.0)?;
    std::fs::write(nimbus::repo::sig_path(&mpath), &good_manifest.1)?;
    // USR-A holds 1.0.0, signed by key 1 alone: made bootable by hand, it
    // is refused by stage 1, which now has set 3.
    let st = Command::new("cgpt")
        .args(["add", "-i", "3", "-P", "9", "-T", "1", "-S", "0"])
        .arg(&disk)
        .status()
        .context("cgpt")?;
    if !st.success() {
        bail!("cgpt add -i 3 failed");
    }
    let mut vm = qemu::Vm::spawn(&vm_opts(vec![pristine.clone()]))?;
    let mut refused = vec![
        r"Nimbus: BIOS boot, stage 1 copy b from ESP".to_string(),
        r"nimbus-init: trust set version 3, 1 of 1 key\(s\)".into(),
        r"nimbus-init: refusing USR-A: .*key is not trusted".into(),
    ];
    refused.extend(good_boot("USR-B", "1.3.0", 1));
    let i = expect(&mut vm, 0, &refused)?;
    steps.done(
        "USR-A (1.0.0, key 1) made bootable by hand is refused by stage 1 (trust set 3); 1.3.0 boots",
    );

    // 5: a stage 1 that cannot start. The guest follows stable again:
    // cloud-config applies its user-data's `coreos.update.group` at every
    // boot, as CoreOS did. Stable's manifest, signed by key 1 until now,
    // is signed again by key 2 with 1.4.0 added.
    publish(&n4, "stable", &[&key2], None)?;
    let mut s1_fails = vec![
        r"Nimbus: BIOS boot, stage 1 copy a from ESP".to_string(),
        r"Kernel panic - not syncing".into(),
        r"Nimbus: BIOS boot, stage 1 copy b from ESP".into(),
    ];
    s1_fails.extend(good_boot("USR-A", "1.4.0", 0));
    expect(&mut vm, i, &s1_fails)?;
    let status = ssh.run_ok("updatectl status | tee /dev/console", long)?;
    for want in [
        "stage 1:   1.4.0 (ESP copy a) was given up",
        "it never came up",
        "running copy b (not installed again)",
        "running:   1.4.0 (slot USR-A)",
    ] {
        if !status.contains(want) {
            bail!("`updatectl status` after the stage-1 fallback lacks {want:?}:\n{status}");
        }
    }
    vm.stop();
    steps.done("1.4.0 with a stage 1 that cannot start: GRUB tries copy a once, the kernel panics, copy b boots 1.4.0; `updatectl status` reports it");

    if nimbus_image::sha256_file(&pristine)? != pristine_sha {
        bail!("the attached pristine disk was written to");
    }
    steps.done("the attached pristine disk is byte-identical");
    // Each version came by delta: only bounded Range requests for pack
    // frames, never the full payload, and a fraction of its size.
    let mut shares = Vec::new();
    for v in ["1.3.0", "1.4.0"] {
        let payload = std::fs::metadata(work.join(format!("repo/payloads/{v}/usr.img.zst")))?;
        let gets = payload_gets(v);
        let full = gets
            .iter()
            .filter(|l| l.path.ends_with("usr.img.zst"))
            .count();
        let ranged = gets
            .iter()
            .all(|l| l.status == 206 && l.range_end.is_some());
        let got: u64 = gets.iter().map(|l| l.body_bytes).sum();
        if gets.is_empty() || full > 0 || !ranged || got * 2 > payload.len() {
            bail!(
                "{v} did not come by delta: {} request(s), {full} of the full payload, {got} of {} bytes: {gets:?}",
                gets.len(),
                payload.len()
            );
        }
        shares.push(format!(
            "{v} {:.1} % in {} request(s)",
            got as f64 * 100.0 / payload.len() as f64,
            gets.len()
        ));
    }
    steps.done(&format!(
        "every update came by delta (pack bytes fetched, of the full payload): {}",
        shares.join(", ")
    ));
    let (a, b) = (cgpt(&disk, 3)?, cgpt(&disk, 4)?);
    // B was given 1.3.0: 2/1/0, the boot took its try, mark-good set
    // successful. A, made bootable by hand and refused by stage 1, then
    // took 1.4.0 above B and was marked good.
    if a != "3/0/1" || b != "2/0/1" {
        bail!("after the story: USR-A {a}, USR-B {b}; expected 3/0/1 and 2/0/1");
    }
    steps
        .rows
        .push((format!("cgpt after shutdown: USR-A {a}, USR-B {b}"), 0.0));

    let table = steps.table();
    print!("{table}");
    // Kept after the work directory is removed: the figures of the last run.
    let _ = std::fs::write(
        work.parent().unwrap_or(work).join("e2e-last-run.md"),
        &table,
    );
    println!("e2e: ok: 1.0.0 -> channel beta -> 1.3.0 (new key, new stage 1) -> 1.4.0 (its stage 1 fell back), all by the guest's own update-engine");
    Ok(())
}
