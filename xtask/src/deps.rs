//! `cargo xtask deps [--vm] [--bench]`: install the host packages listed in
//! .ci/packages.txt (the build and the default test tier), plus
//! .ci/packages-vm.txt (the VM tier) and .ci/packages-bench.txt (the
//! benchmarks) when asked. One list per purpose serves the README,
//! `.ci/run` and this command, so they cannot drift apart.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

/// The packages of `.ci/<file>`.
pub fn package_list_of(file: &str) -> anyhow::Result<Vec<String>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.ci")
        .join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// The default tier's packages.
pub fn package_list() -> anyhow::Result<Vec<String>> {
    package_list_of("packages.txt")
}

/// apt's own network timeouts are per connection; this bounds a whole call.
const APT_LIMIT_S: u64 = 1800;

/// Entries may name a release (`qemu-utils/bookworm`); dpkg knows only the name.
fn name(entry: &str) -> &str {
    entry.split('/').next().unwrap_or(entry)
}

fn missing(pkgs: &[String]) -> anyhow::Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status} ${Version}\n"])
        .args(pkgs.iter().map(|p| name(p)))
        .output()
        .context("dpkg-query (is this a Debian system?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "name installed version" lines for what is installed.
    let installed: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (n, st, v) = (w.next()?, w.next()?, w.next().unwrap_or(""));
            (st == "installed").then_some((n, v))
        })
        .collect();
    Ok(pkgs
        .iter()
        .filter(|p| {
            match installed.iter().find(|(n, _)| *n == name(p)) {
                None => true,
                // A pinned release must be what is installed: bookworm's
                // qemu-utils is 7.x, backports' 10.x breaks qemu-system.
                Some((_, v)) => p.ends_with("/bookworm") && v.contains("bpo"),
            }
        })
        .cloned()
        .collect())
}

pub fn run(check: bool, vm: bool, bench: bool) -> anyhow::Result<ExitCode> {
    let mut pkgs = package_list()?;
    if vm {
        pkgs.extend(package_list_of("packages-vm.txt")?);
    }
    if bench {
        pkgs.extend(package_list_of("packages-bench.txt")?);
    }
    let miss = missing(&pkgs)?;
    if miss.is_empty() {
        eprintln!("deps: all {} packages installed", pkgs.len());
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("deps: missing: {}", miss.join(" "));
    if check {
        return Ok(ExitCode::FAILURE);
    }
    if !nix_is_root() {
        bail!(
            "installing packages needs root: run `sudo apt-get install {}`",
            miss.join(" ")
        );
    }
    let status = nimbus_testkit::proc::status(
        Command::new("apt-get").arg("update"),
        std::time::Duration::from_secs(APT_LIMIT_S),
    )
    .context("apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    let status = nimbus_testkit::proc::status(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "--allow-downgrades",
            ])
            .args(&miss)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        std::time::Duration::from_secs(APT_LIMIT_S),
    )
    .context("apt-get install")?;
    if !status.success() {
        bail!("apt-get install failed ({status})");
    }
    Ok(ExitCode::SUCCESS)
}

fn nix_is_root() -> bool {
    // The effective uid (second field of Uid:) from /proc needs no libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
