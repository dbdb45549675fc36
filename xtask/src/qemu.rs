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
    /// Give up after this many seconds (exit 1).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
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

/// A VM running in the background whose console lines are collected, for
/// tests that act on the guest while it runs (`cargo xtask e2e`).
pub struct Vm {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _scratch: tempfile::TempDir,
}

impl Vm {
    /// Start `a.image`; the console goes to `a.serial_log` (and stdout
    /// unless `a.quiet`). `a.until` and `a.timeout` are not used: the
    /// caller waits with [`Vm::wait_for`].
    pub fn spawn(a: &Qemu) -> anyhow::Result<Vm> {
        let image = a.image.clone().context("Vm::spawn needs an image")?;
        let scratch = tempfile::tempdir()?;
        let mut child = command(a, &image, scratch.path())?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("qemu-system-x86_64 (cargo xtask deps installs qemu-system-x86)")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let mut log = a
            .serial_log
            .as_ref()
            .map(std::fs::File::create)
            .transpose()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let quiet = a.quiet;
        let sink = lines.clone();
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
                if let Ok(mut v) = sink.lock() {
                    v.push(line.trim_end_matches('\n').to_string());
                }
            }
        });
        Ok(Vm {
            child,
            lines,
            reader: Some(reader),
            _scratch: scratch,
        })
    }

    /// Index of the first console line at or after `from` matching `re`;
    /// an error when `timeout` passes or the VM stops first.
    pub fn wait_for(&mut self, re: &str, from: usize, timeout: Duration) -> anyhow::Result<usize> {
        let r = regex::Regex::new(re)?;
        let t0 = Instant::now();
        loop {
            let hit = self.lines.lock().ok().and_then(|v| {
                v.iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| r.is_match(l))
                    .map(|(i, _)| i)
            });
            if let Some(i) = hit {
                return Ok(i);
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("the VM stopped ({st}) before /{re}/ appeared on the console");
            }
            if t0.elapsed() > timeout {
                bail!("no /{re}/ on the console within {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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
    let until = a
        .until
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("--until")?;
    let mut marks: Vec<(String, regex::Regex)> = a
        .mark
        .iter()
        .map(|m| regex::Regex::new(m).map(|r| (m.clone(), r)))
        .collect::<Result<_, _>>()
        .context("--mark")?;
    let scratch = tempfile::tempdir()?;
    let mut cmd = command(&a, &image, scratch.path())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-system-x86_64 (cargo xtask deps installs qemu-system-x86)")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let timed_out = Arc::new(Mutex::new(false));
    {
        let timed_out = timed_out.clone();
        let limit = Duration::from_secs(a.timeout);
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            if let Ok(mut t) = timed_out.lock() {
                *t = true;
            }
            let _ = Command::new("kill").arg(pid.to_string()).status();
        });
    }
    let mut log = a
        .serial_log
        .as_ref()
        .map(std::fs::File::create)
        .transpose()?;
    let t0 = Instant::now();
    let mut matched = false;
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    let mut console = std::io::stdout().lock();
    while reader.read_until(b'\n', &mut raw)? > 0 {
        let line = String::from_utf8_lossy(&raw).replace('\r', "");
        raw.clear();
        if !a.quiet {
            let _ = console.write_all(line.as_bytes());
        }
        if let Some(l) = log.as_mut() {
            let _ = l.write_all(line.as_bytes());
        }
        marks.retain(|(m, re)| {
            let hit = re.is_match(&line);
            if hit {
                eprintln!("qemu: mark /{m}/ at {:.3} s", t0.elapsed().as_secs_f64());
            }
            !hit
        });
        if !matched && until.as_ref().is_some_and(|re| re.is_match(&line)) {
            matched = true;
            eprintln!("qemu: matched after {:.1} s", t0.elapsed().as_secs_f64());
            if a.until_delay_ms == 0 {
                let _ = child.kill();
                break;
            }
            // Keep draining the console (a full pipe would stall the guest)
            // until the cut.
            let delay = Duration::from_millis(a.until_delay_ms);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            });
        }
    }
    let status = child.wait()?;
    let timed_out = timed_out.lock().map(|t| *t).unwrap_or(false);
    // Output still buffered when the watchdog killed QEMU can match late:
    // past the deadline is a timeout all the same.
    if matched && !timed_out {
        return Ok(ExitCode::SUCCESS);
    }
    if timed_out {
        eprintln!(
            "qemu: timeout after {} s{}",
            a.timeout,
            a.until
                .as_deref()
                .map(|u| format!(" waiting for /{u}/"))
                .unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }
    if until.is_some() {
        eprintln!(
            "qemu: VM stopped ({status}) before /{}/ appeared",
            a.until.unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
