//! `toolbox` on a booted guest (docs/toolbox.md): with no image it says in
//! one line how to get one; with a Debian image made here by mmdebstrap
//! and `docker import`ed, it runs commands against the host's root at
//! /media/root and apt-get, in one container that later calls reuse.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::vm::e2e::Ssh;

/// The tag the guest knows the imported image by.
const IMAGE: &str = "nimbus/toolbox-debian";
const TAG: &str = "bookworm";

/// A minbase Debian (apt included) as a root-filesystem tarball, made once
/// and kept in the build cache: mmdebstrap fetches from Debian's mirror.
fn debian_tar() -> anyhow::Result<PathBuf> {
    let cache = crate::build_image::workspace_root().join("target/nimbus/cache");
    std::fs::create_dir_all(&cache)?;
    let out = cache.join("toolbox-debian-bookworm.tar");
    if out.exists() {
        return Ok(out);
    }
    // Made whole beside the cache entry, renamed into place: a run killed
    // halfway leaves no half tarball to be taken for a whole one.
    let tmp = tempfile::Builder::new()
        .prefix(".toolbox-debian-")
        .suffix(".tar")
        .tempfile_in(&cache)?
        .into_temp_path();
    let st = nimbus_testkit::proc::status(
        Command::new("mmdebstrap")
            .args(["--quiet", "--variant=minbase", "--format=tar", "bookworm"])
            .arg(&*tmp)
            .arg("http://deb.debian.org/debian"),
        Duration::from_secs(900),
    )
    .context("mmdebstrap (`cargo xtask deps` installs it)")?;
    if !st.success() {
        bail!("mmdebstrap of a Debian bookworm minbase failed ({st})");
    }
    tmp.persist(&out)?;
    Ok(out)
}

/// Run the toolbox checks on the guest behind `ssh`; a summary for the
/// story's table.
pub fn check(ssh: &Ssh) -> anyhow::Result<String> {
    let run = |cmd: &str| -> anyhow::Result<(bool, String, String)> {
        let o = ssh.run_within(cmd, Duration::from_secs(300))?;
        Ok((
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    };
    // No image: a registry that refuses at once (nothing here reaches
    // Docker Hub, and a dead end must not be waited out).
    let (ok, out, err) = run(
        "printf 'TOOLBOX_DOCKER_IMAGE=localhost:1/none\\nTOOLBOX_DOCKER_TAG=x\\n' > /root/.toolboxrc && toolbox true",
    )?;
    if ok || err.lines().count() != 1 || !err.contains("docker load") || !err.contains(".toolboxrc")
    {
        bail!("toolbox without an image: want exit 1 and one line saying how to load or configure one; got ok={ok} stdout={out:?} stderr={err:?}");
    }
    let tar = debian_tar()?;
    let o = ssh.run_from(
        &format!("docker import - {IMAGE}:{TAG} >/dev/null && printf 'TOOLBOX_DOCKER_IMAGE={IMAGE}\\nTOOLBOX_DOCKER_TAG={TAG}\\n' > /root/.toolboxrc"),
        std::fs::File::open(&tar)
            .with_context(|| tar.display().to_string())?
            .into(),
        Duration::from_secs(600),
    )?;
    if !o.status.success() {
        bail!(
            "docker import of {} in the guest failed: {}",
            tar.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let id = "docker container inspect -f '{{.Id}}' toolbox-root";
    let (ok, out, err) = run("toolbox cat /media/root/etc/os-release")?;
    if !ok || !out.contains("ID=nimbus") {
        bail!("toolbox cat /media/root/etc/os-release: ok={ok} {out}{err}");
    }
    let (_, first, _) = run(id)?;
    let (ok, out, err) = run("toolbox apt-get --version")?;
    if !ok || !out.starts_with("apt ") {
        bail!("toolbox apt-get --version: ok={ok} {out}{err}");
    }
    let (_, second, _) = run(id)?;
    let (_, all, _) = run("docker ps -aq --filter label=org.nimbus.toolbox=1")?;
    if first.trim().is_empty() || first != second || all.lines().count() != 1 {
        bail!("toolbox did not reuse its container: {first:?} then {second:?}, toolboxes: {all:?}");
    }
    Ok(format!(
        "toolbox: no image -> one line; a Debian made by mmdebstrap ({} MiB) imported; the host's os-release at /media/root and apt-get in it; container {} reused",
        std::fs::metadata(&tar)?.len() >> 20,
        &first.trim()[..12.min(first.trim().len())]
    ))
}
