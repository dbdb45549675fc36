//! `cargo xtask qemu`: boot a Nimbus image under QEMU (TCG: these machines
//! have no usable KVM). `--firmware direct` (the default) boots the ESP's
//! stage-1 kernel and initramfs directly (fast); `--firmware bios` boots the
//! disk as plain `qemu-system-x86_64` does, through SeaBIOS and GRUB in the
//! MBR and BIOS-BOOT; `--firmware uefi` through OVMF and systemd-boot. The serial console goes to stdout; `--until REGEX`
//! ends the VM with exit 0 once a console line matches, and a timeout ends
//! it with exit 1.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nimbus::gpt::Disk;

#[derive(Args, Clone)]
pub struct Qemu {
    /// Raw disk image (default: target/nimbus/<version>/nimbus.raw).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// How the VM boots: direct (QEMU loads the ESP's stage-1 kernel),
    /// bios (SeaBIOS -> GRUB in the MBR), uefi (OVMF -> systemd-boot).
    #[arg(long, value_enum, default_value_t = Firmware::Direct)]
    pub firmware: Firmware,
    /// Same as --firmware uefi.
    #[arg(long)]
    pub uefi: bool,
    /// Another disk image to attach (raw or qcow2), before the boot disk so
    /// it is the guest's /dev/vda; the firmware still boots the image.
    /// Repeatable.
    #[arg(long)]
    pub extra_disk: Vec<PathBuf>,
    /// Also write the console to this file.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Give up after this many seconds (exit 1; 0: no overall limit).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Each boot stage (firmware and loader, stage 1, stage 2 to
    /// multi-user) must finish within this many seconds, or QEMU is killed
    /// and the failure names the stage with the last console lines.
    #[arg(long, default_value_t = STAGE_TIMEOUT_S)]
    pub stage_timeout: u64,
    /// Stop the VM and exit 0 once a console line matches.
    #[arg(long)]
    pub until: Option<String>,
    /// With --until: let the VM run this many milliseconds more after the
    /// match, then kill it (SIGKILL: a power cut, for crash tests).
    #[arg(long, default_value_t = 0)]
    pub until_delay_ms: u64,
    /// Host port forwarded to the guest's SSH port.
    #[arg(long, default_value_t = 2222)]
    pub ssh_port: u16,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Extra kernel command line (direct boot only).
    #[arg(long, default_value = "")]
    pub append: String,
    /// Report on stderr when a line matching REGEX first appears
    /// (`qemu: mark /REGEX/ at S s`); repeatable. For benchmarks.
    #[arg(long)]
    pub mark: Vec<String>,
    /// Do not echo the console to stdout (it still goes to --serial-log).
    #[arg(long)]
    pub quiet: bool,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Also forward host port HOST (on 127.0.0.1) to guest port GUEST on
    /// the user-mode NIC. Repeatable.
    #[arg(long, value_name = "HOST:GUEST")]
    pub forward: Vec<String>,
    /// A second NIC joined to a virtual switch on this machine: frames go
    /// as UDP datagrams between 127.0.0.1:LOCAL and the switch at
    /// 127.0.0.1:SWITCH (`cargo xtask cluster` runs the switch).
    #[arg(long, value_name = "LOCAL:SWITCH:MAC")]
    pub switch: Option<String>,
    /// Give the guest this user-data through QEMU's fw_cfg
    /// (opt/org.nimbus/user-data, read by cloud-config at boot).
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// How the disks treat the guest's flushes: `writeback` passes each
    /// one to this machine's disk; `unsafe` drops them (what the guest
    /// wrote still reaches this machine's page cache, so killing QEMU loses
    /// nothing; only a crash of this machine would).
    #[arg(long, value_enum, default_value_t = Cache::Writeback)]
    pub cache: Cache,
}

impl Qemu {
    /// What the test harnesses boot (e2e, smoke, cluster): `image` as plain
    /// QEMU does (SeaBIOS, GRUB from the MBR at every reboot), 2 vCPUs and
    /// 2 GiB, the console to `log` only, ssh forwarded from `ssh_port`, no
    /// overall limit (the callers' waits are bounded) and the default
    /// deadline per boot stage.
    pub fn harness(image: &Path, log: &Path, ssh_port: u16) -> Qemu {
        Qemu {
            image: Some(image.to_path_buf()),
            firmware: Firmware::Bios,
            uefi: false,
            extra_disk: Vec::new(),
            serial_log: Some(log.to_path_buf()),
            timeout: 0,
            stage_timeout: STAGE_TIMEOUT_S,
            until: None,
            until_delay_ms: 0,
            ssh_port,
            memory: 2048,
            append: String::new(),
            mark: Vec::new(),
            quiet: true,
            smp: 2,
            forward: Vec::new(),
            switch: None,
            user_data: None,
            cache: Cache::Writeback,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    Direct,
    Bios,
    Uefi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cache {
    Writeback,
    Unsafe,
}

impl Cache {
    fn qemu(self) -> &'static str {
        match self {
            Cache::Writeback => "writeback",
            Cache::Unsafe => "unsafe",
        }
    }
}

fn drive_format(p: &Path) -> &'static str {
    if p.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

/// Copy the stage-1 kernel and initramfs out of the image's ESP, from the
/// copy GRUB would start (and spend a trial's try as GRUB does, when the
/// image is the raw disk itself). The copy goes on the command line.
fn extract_boot(
    image: &Path,
    dir: &Path,
    write_back: bool,
) -> anyhow::Result<(PathBuf, PathBuf, nimbus::esp::Copy)> {
    use nimbus::esp::Esp;
    let disk = Disk::open_path(image, false)?;
    let esp = nimbus_updater::esp::ImageEsp {
        image: image.to_path_buf(),
        offset: disk.partition(1)?.offset_bytes(),
    };
    drop(disk);
    let mut got = None;
    esp.with(write_back, &mut |fs| {
        let (copy, next) = nimbus::esp::grubenv(fs)?.grub_boot();
        if write_back && next != nimbus::esp::grubenv(fs)? {
            fs.replace(nimbus::esp::GRUBENV, &next.to_bytes()?)?;
        }
        let mut files = Vec::new();
        for (rel, name) in [(copy.kernel(), "vmlinuz"), (copy.initramfs(), "stage1.img")] {
            let b = fs
                .read(&rel, 1 << 30)?
                .ok_or_else(|| nimbus::esp::EspError::Invalid(format!("{rel} is missing")))?;
            let to = dir.join(name);
            std::fs::write(&to, b).map_err(|source| nimbus::esp::EspError::Io {
                path: to.clone(),
                source,
            })?;
            files.push(to);
        }
        got = Some((files[0].clone(), files[1].clone(), copy));
        Ok(())
    })
    .with_context(|| format!("{}: reading stage 1 from the ESP", image.display()))?;
    got.context("no stage 1 read")
}

/// The QEMU command line for `a`, with the boot files placed in `scratch`.
fn command(a: &Qemu, image: &Path, scratch: &Path) -> anyhow::Result<Command> {
    let firmware = if a.uefi { Firmware::Uefi } else { a.firmware };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-smp",
        &a.smp.max(1).to_string(),
        "-m",
        &a.memory.to_string(),
    ])
    .args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
    for (i, d) in a.extra_disk.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!(
                "file={},format={},if=none,id=extra{i},cache={}",
                d.display(),
                drive_format(d),
                a.cache.qemu()
            ))
            .args(["-device", &format!("virtio-blk-pci,drive=extra{i}")]);
    }
    cmd.arg("-drive")
        .arg(format!(
            "file={},format={},if=none,id=boot,cache={}",
            image.display(),
            drive_format(image),
            a.cache.qemu()
        ))
        // The firmware boots this disk, not the extra ones (QEMU's -kernel
        // loader takes bootindex 0 itself).
        .args([
            "-device",
            if firmware == Firmware::Direct {
                "virtio-blk-pci,drive=boot"
            } else {
                "virtio-blk-pci,drive=boot,bootindex=0"
            },
        ])
        .args(["-device", "virtio-net-pci,netdev=net0"]);
    let mut user = format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", a.ssh_port);
    for f in &a.forward {
        let Some((h, g)) = f.split_once(':') else {
            bail!("--forward {f:?}: expected HOST:GUEST");
        };
        let (h, g): (u16, u16) = (
            h.parse().with_context(|| format!("--forward {f:?}"))?,
            g.parse().with_context(|| format!("--forward {f:?}"))?,
        );
        user.push_str(&format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"));
    }
    cmd.args(["-netdev", &user]);
    if let Some(sw) = &a.switch {
        let parts: Vec<&str> = sw.splitn(3, ':').collect();
        let [local, switch, mac] = parts.as_slice() else {
            bail!("--switch {sw:?}: expected LOCAL:SWITCH:MAC");
        };
        let (local, switch): (u16, u16) = (
            local.parse().with_context(|| format!("--switch {sw:?}"))?,
            switch.parse().with_context(|| format!("--switch {sw:?}"))?,
        );
        cmd.args([
            "-netdev",
            &format!("socket,id=net1,udp=127.0.0.1:{switch},localaddr=127.0.0.1:{local}"),
            "-device",
            &format!("virtio-net-pci,netdev=net1,mac={mac}"),
        ]);
    }
    if let Some(ud) = &a.user_data {
        cmd.arg("-fw_cfg").arg(format!(
            "name=opt/org.nimbus/user-data,file={}",
            ud.display()
        ));
    }
    if firmware == Firmware::Uefi {
        let vars = scratch.join("OVMF_VARS.fd");
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
            .context("OVMF (cargo xtask deps installs ovmf)")?;
        cmd.arg("-drive")
            .arg("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    } else if firmware == Firmware::Direct {
        let raw = if drive_format(image) == "raw" {
            image.to_path_buf()
        } else {
            let r = scratch.join("boot.raw");
            let st = Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(image)
                .arg(&r)
                .status()
                .context("qemu-img")?;
            if !st.success() {
                bail!("{}: qemu-img convert failed", image.display());
            }
            r
        };
        let (kernel, initrd, copy) = extract_boot(&raw, scratch, raw == image)?;
        // What a loader does: name the ESP stage 1 came from, so stage 1
        // finds this disk among several.
        let esp = Disk::open_path(&raw, false)?.partition(1)?.uuid;
        cmd.arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(
                format!(
                    "{} nimbus.esp=PARTUUID={esp} nimbus.stage1={copy} {}",
                    nimbus_image::pipeline::KERNEL_CMDLINE,
                    a.append
                )
                .trim(),
            );
    } else if !a.append.is_empty() {
        bail!("--append works with --firmware direct only (the loader on the disk sets the command line)");
    }
    Ok(cmd)
}

/// The stages of a boot, in order, each ended by the first console line
/// matching its pattern. The watchdog gives each stage its own deadline:
/// a guest that hangs anywhere in a boot is killed within one stage's
/// time, and the failure names the stage it hung in.
pub const BOOT_STAGES: [(&str, &str); 3] = [
    // From power-on (or a reset) to the stage-1 kernel's first line.
    ("firmware and loader", r"Linux version "),
    // Stage 1: slot selection, verity, kexec into the slot's kernel.
    ("stage 1", r"nimbus-init: stage 1 done"),
    // The slot's kernel and systemd, up to the login prompt or mark-good
    // (whichever the console shows first; both follow multi-user).
    ("stage 2 to multi-user", r"nimbus-mark-good: |login: "),
];

/// Console lines that start a new boot in the same guest life: a reboot,
/// a panic that resets (panic=-1), a loader starting again.
const BOOT_STARTS: &str = r"reboot: Restarting system|Kernel panic - not syncing|Nimbus: BIOS boot";

/// Default deadline of one boot stage, seconds (`--stage-timeout`).
pub const STAGE_TIMEOUT_S: u64 = 240;

/// How many console lines a failure carries.
const TAIL_LINES: usize = 60;

struct Console {
    /// Every console line, with when it arrived.
    lines: Vec<(Instant, String)>,
    /// The boot stage the guest is in, since when its clock runs, and the
    /// furthest stage this boot reached; None once booted. A reset in the
    /// middle of a boot (a panic, a loader's fallback) goes back to the
    /// first stage without restarting the clock, and a stage's clock
    /// restarts only when the boot gets further than before: a guest
    /// caught in a reset loop trips the deadline like a hung one.
    stage: Option<(usize, Instant, usize)>,
    /// Why the watchdog killed QEMU, if it did.
    killed: Option<String>,
    /// The console reached its end (QEMU exited).
    closed: bool,
}

impl Console {
    fn tail(&self) -> String {
        let from = self.lines.len().saturating_sub(TAIL_LINES);
        self.lines[from..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A VM running in the background whose console lines are collected, for
/// tests that act on the guest while it runs (`cargo xtask e2e`). A
/// watchdog thread kills it (SIGKILL) when a boot stage outlives its
/// deadline or the VM outlives `timeout`; every wait on it is bounded.
pub struct Vm {
    child: std::process::Child,
    console: Arc<Mutex<Console>>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: Instant,
    _scratch: tempfile::TempDir,
}

fn sigkill(pid: u32) {
    // std's Child::kill needs the Child, which the VM's owner holds; the
    // watchdog kills by pid (QEMU is our child and not yet reaped, so the
    // pid cannot have been reused).
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

impl Vm {
    /// Start `a.image`; the console goes to `a.serial_log` (and stdout
    /// unless `a.quiet`). Each boot stage must finish within
    /// `a.stage_timeout` seconds, and the whole VM within `a.timeout`
    /// (0: no overall limit; the caller's waits are bounded).
    pub fn spawn(a: &Qemu) -> anyhow::Result<Vm> {
        let image = a.image.clone().context("Vm::spawn needs an image")?;
        let scratch = tempfile::tempdir()?;
        let mut child = command(a, &image, scratch.path())?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("qemu-system-x86_64 (cargo xtask deps installs qemu-system-x86)")?;
        let pid = child.id();
        let stdout = child.stdout.take().context("qemu stdout")?;
        let mut log = a
            .serial_log
            .as_ref()
            .map(std::fs::File::create)
            .transpose()?;
        let started = Instant::now();
        let console = Arc::new(Mutex::new(Console {
            lines: Vec::new(),
            stage: Some((0, started, 0)),
            killed: None,
            closed: false,
        }));
        let quiet = a.quiet;
        let sink = console.clone();
        let ends: Vec<regex::Regex> = BOOT_STAGES
            .iter()
            .map(|(_, re)| regex::Regex::new(re))
            .collect::<Result<_, _>>()?;
        let restart = regex::Regex::new(BOOT_STARTS)?;
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut raw = Vec::new();
            while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
                let line = String::from_utf8_lossy(&raw).replace('\r', "");
                raw.clear();
                if !quiet {
                    let _ = std::io::stdout().write_all(line.as_bytes());
                }
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(line.as_bytes());
                }
                let line = line.trim_end_matches('\n').to_string();
                if let Ok(mut c) = sink.lock() {
                    let now = Instant::now();
                    if restart.is_match(&line) {
                        c.stage = match c.stage {
                            // A new boot of a booted guest.
                            None => Some((0, now, 0)),
                            Some((_, since, high)) => Some((0, since, high)),
                        };
                    }
                    if let Some((i, since, high)) = c.stage {
                        if ends[i].is_match(&line) {
                            if i == 0 {
                                // A boot reached its first kernel: count it.
                                crate::ledger::record("boot", "");
                            }
                            let next = i + 1;
                            let clock = if next > high {
                                (next, now, next)
                            } else {
                                (next, since, high)
                            };
                            c.stage = (next < ends.len()).then_some(clock);
                        }
                    }
                    c.lines.push((now, line));
                }
            }
            if let Ok(mut c) = sink.lock() {
                c.closed = true;
            }
        });
        let stage_limit = Duration::from_secs(a.stage_timeout.max(1));
        let overall = (a.timeout > 0).then(|| Duration::from_secs(a.timeout));
        let watch = console.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let Ok(mut c) = watch.lock() else { return };
            if c.closed {
                return;
            }
            let why = if let Some((i, since, _)) =
                c.stage.filter(|(_, t, _)| t.elapsed() > stage_limit)
            {
                Some(format!(
                    "boot stage `{}` did not finish within {} s (no console line matching /{}/ since {:.0} s into the VM)",
                    BOOT_STAGES[i].0,
                    stage_limit.as_secs(),
                    BOOT_STAGES[i].1,
                    since.duration_since(started).as_secs_f64()
                ))
            } else {
                overall
                    .filter(|o| started.elapsed() > *o)
                    .map(|o| format!("the VM ran past its overall limit of {} s", o.as_secs()))
            };
            if let Some(why) = why {
                c.killed = Some(why);
                drop(c);
                sigkill(pid);
                return;
            }
        });
        Ok(Vm {
            child,
            console,
            reader: Some(reader),
            started,
            _scratch: scratch,
        })
    }

    /// The last console lines, for failure messages.
    pub fn tail(&self) -> String {
        self.console.lock().map(|c| c.tail()).unwrap_or_default()
    }

    /// Why the watchdog killed the VM, if it did.
    pub fn killed(&self) -> Option<String> {
        self.console.lock().ok().and_then(|c| c.killed.clone())
    }

    /// Seconds since the VM started at which the first line at or after
    /// line `from` matching `re` arrived, if one did.
    pub fn seen_at(&self, re: &regex::Regex, from: usize) -> Option<(usize, f64)> {
        let c = self.console.lock().ok()?;
        c.lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, (_, l))| re.is_match(l))
            .map(|(i, (t, _))| (i, t.duration_since(self.started).as_secs_f64()))
    }

    /// Index of the first console line at or after `from` matching `re`;
    /// an error when `timeout` passes, the watchdog kills the VM (a boot
    /// stage hung) or the VM stops first. Every error names what was
    /// awaited and carries the last console lines.
    pub fn wait_for(&mut self, re: &str, from: usize, timeout: Duration) -> anyhow::Result<usize> {
        let r = regex::Regex::new(re)?;
        let t0 = Instant::now();
        loop {
            if let Some((i, _)) = self.seen_at(&r, from) {
                return Ok(i);
            }
            let why = if let Some(st) = self.child.try_wait()? {
                // Let the reader take in the last lines before judging.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                if let Some((i, _)) = self.seen_at(&r, from) {
                    return Ok(i);
                }
                match self.killed() {
                    Some(k) => format!("{k}; QEMU was killed (SIGKILL)"),
                    None => format!("the VM stopped ({st})"),
                }
            } else if t0.elapsed() > timeout {
                self.stop();
                format!(
                    "no line within {} s; QEMU was killed (SIGKILL)",
                    timeout.as_secs()
                )
            } else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            bail!(
                "waiting for /{re}/ on the console: {why}\n--- last {TAIL_LINES} console lines ---\n{}",
                self.tail()
            );
        }
    }

    /// Wait for QEMU to exit by itself; the watchdog bounds the wait (a
    /// VM spawned with `timeout` 0 and a booted guest can run forever:
    /// interactive use only).
    pub fn wait_exit(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let st = self.child.wait()?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(st)
    }

    /// Power off (kill) the VM and wait for it; the console log is complete
    /// afterwards.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// Kill the VM (SIGKILL: a power cut) `after` from now, while the
    /// console is still read.
    pub fn cut_after(&mut self, after: Duration) {
        std::thread::sleep(after);
        self.stop();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn run(a: Qemu) -> anyhow::Result<ExitCode> {
    let root = crate::build_image::workspace_root();
    let image = a.image.clone().unwrap_or_else(|| {
        root.join("target/nimbus")
            .join(env!("CARGO_PKG_VERSION"))
            .join("nimbus.raw")
    });
    if !image.is_file() {
        bail!(
            "{}: no such image (build one with `cargo xtask build-image`)",
            image.display()
        );
    }
    if let Some(u) = &a.until {
        regex::Regex::new(u).context("--until")?;
    }
    let marks: Vec<(String, regex::Regex)> = a
        .mark
        .iter()
        .map(|m| regex::Regex::new(m).map(|r| (m.clone(), r)))
        .collect::<Result<_, _>>()
        .context("--mark")?;
    let mut a = a;
    a.image = Some(image);
    let mut vm = Vm::spawn(&a)?;
    let report_marks = |vm: &Vm| {
        for (m, re) in &marks {
            if let Some((_, at)) = vm.seen_at(re, 0) {
                eprintln!("qemu: mark /{m}/ at {at:.3} s");
            }
        }
    };
    let Some(until) = a.until.as_deref() else {
        // No pattern: run until the guest powers off (or a limit hits).
        let st = vm.wait_exit()?;
        report_marks(&vm);
        if let Some(k) = vm.killed() {
            eprintln!(
                "qemu: {k}; QEMU was killed (SIGKILL)\n--- last console lines ---\n{}",
                vm.tail()
            );
            return Ok(ExitCode::FAILURE);
        }
        return Ok(if st.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    };
    // The watchdog enforces `timeout` (and each stage's); this bound is a backstop.
    let limit = if a.timeout == 0 {
        365 * 86400
    } else {
        a.timeout + 5
    };
    match vm.wait_for(until, 0, Duration::from_secs(limit)) {
        Ok(_) => {
            eprintln!(
                "qemu: matched after {:.1} s",
                vm.started.elapsed().as_secs_f64()
            );
            vm.cut_after(Duration::from_millis(a.until_delay_ms));
            report_marks(&vm);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            report_marks(&vm);
            eprintln!("qemu: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}
