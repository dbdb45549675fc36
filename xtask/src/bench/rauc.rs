//! The RAUC row of `cargo xtask bench update`: Debian's RAUC 1.8 installs
//! a plain bundle holding the same raw slot image into a loop-device slot.
//! RAUC runs as it does on a device, a `rauc service` answering `rauc
//! install` over D-Bus, here on a private session bus (RAUC takes the
//! session bus when DBUS_STARTER_BUS_TYPE=session), with the noop
//! bootloader and the booted slot named by --override-boot-slot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::common::{median3, timed_sh};

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run it"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A bundle of the payload's raw image, made once per payload: squashfs
/// with `rauc bundle`'s defaults, or with `mksquashfs` arguments.
fn bundle(work: &Path, zst: &Path, squashfs: Option<&str>) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = work.join(format!("rauc-{}", squashfs.map_or("default", |_| "custom")));
    let bundle = dir.join("usr.raucb");
    let cert = dir.join("cert.pem");
    let stamp = dir.join("payload.sha256");
    let sha = nimbus_image::sha256_file(zst)?;
    if bundle.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&sha) {
        return Ok((bundle, cert));
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("content"))?;
    run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=nimbus-bench",
                "-days",
                "30",
                "-keyout",
            ])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(&cert),
        "openssl req",
    )?;
    eprintln!("bench update: making the RAUC bundle (mksquashfs {squashfs:?}) ...");
    let st = Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(dir.join("content/usr.img"))
        .arg(zst)
        .status()?;
    if !st.success() {
        bail!("zstd -d {}", zst.display());
    }
    std::fs::write(
        dir.join("content/manifest.raucm"),
        "[update]\ncompatible=nimbus-bench\nversion=1.0.0\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=usr.img\n",
    )?;
    let mut cmd = Command::new("rauc");
    cmd.arg("bundle")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(dir.join("key.pem"));
    if let Some(a) = squashfs {
        cmd.arg(format!("--mksquashfs-args={a}"));
    }
    run(cmd.arg(dir.join("content")).arg(&bundle), "rauc bundle")?;
    std::fs::remove_dir_all(dir.join("content"))?;
    std::fs::write(&stamp, sha)?;
    Ok((bundle, cert))
}

struct Session {
    dbus: Child,
    service: Option<Child>,
    loops: Vec<String>,
    addr: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(s) = self.service.as_mut() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.dbus.kill();
        let _ = self.dbus.wait();
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
    }
}

/// Median seconds of `rauc install` of the payload's image (3 runs), the
/// bundle made with `squashfs` arguments (None: RAUC's defaults).
pub fn install_median(
    work: &Path,
    zst: &Path,
    raw_size: u64,
    slot_size: u64,
    squashfs: Option<&str>,
) -> anyhow::Result<f64> {
    for tool in ["rauc", "mksquashfs", "dbus-daemon", "losetup", "openssl"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!("{tool} is missing: `cargo xtask deps` installs rauc, squashfs-tools, dbus, util-linux, openssl");
        }
    }
    let (bundle, cert) = bundle(work, zst, squashfs)?;
    let dir = bundle.parent().unwrap_or(work).to_path_buf();
    let mut loops = Vec::new();
    for n in 0..2 {
        let f = dir.join(format!("slot{n}.img"));
        let _ = std::fs::remove_file(&f);
        std::fs::File::create(&f)?.set_len(slot_size)?;
        loops.push(run(
            Command::new("losetup").args(["-f", "--show"]).arg(&f),
            "losetup",
        )?);
    }
    let mut dbus = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("dbus-daemon")?;
    let addr = {
        use std::io::BufRead;
        let out = dbus.stdout.take().context("dbus stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        line.trim().to_string()
    };
    let mut s = Session {
        dbus,
        service: None,
        loops,
        addr,
    };
    let conf = dir.join("system.conf");
    std::fs::write(
        &conf,
        format!(
            "[system]\ncompatible=nimbus-bench\nbootloader=noop\nmax-bundle-download-size={}\n\n[keyring]\npath={}\n\n\
             [slot.rootfs.0]\ndevice={}\ntype=raw\nbootname=A\n\n[slot.rootfs.1]\ndevice={}\ntype=raw\nbootname=B\n",
            4 * raw_size,
            cert.display(),
            s.loops[0],
            s.loops[1]
        ),
    )?;
    s.service = Some(
        Command::new("rauc")
            .arg("service")
            .arg(format!("--conf={}", conf.display()))
            .arg("--override-boot-slot=A")
            .env("DBUS_SESSION_BUS_ADDRESS", &s.addr)
            .env("DBUS_STARTER_BUS_TYPE", "session")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("rauc service")?,
    );
    // Wait until the service answers.
    let t0 = Instant::now();
    loop {
        let ok = Command::new("rauc")
            .arg("status")
            .env("DBUS_SESSION_BUS_ADDRESS", &s.addr)
            .env("DBUS_STARTER_BUS_TYPE", "session")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if ok {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("rauc service did not answer on the session bus");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = median3(|| {
        timed_sh(&format!("cat {} > /dev/null", bundle.display()))?;
        timed_sh(&format!(
            "DBUS_SESSION_BUS_ADDRESS='{}' DBUS_STARTER_BUS_TYPE=session rauc install {} > /dev/null",
            s.addr,
            bundle.display()
        ))
    })?;
    // The slot RAUC wrote holds the image.
    let got = run(
        Command::new("sh").arg("-c").arg(format!(
            "head -c {raw_size} {} | sha256sum | cut -d' ' -f1",
            s.loops[1]
        )),
        "hashing RAUC's slot",
    )?;
    let want = run(
        Command::new("sh").arg("-c").arg(format!(
            "zstd -q -d -c {} | sha256sum | cut -d' ' -f1",
            zst.display()
        )),
        "hashing the payload",
    )?;
    if got != want {
        bail!("RAUC's slot does not hold the image ({got} != {want})");
    }
    drop(s);
    for n in 0..2 {
        let _ = std::fs::remove_file(dir.join(format!("slot{n}.img")));
    }
    Ok(secs)
}
