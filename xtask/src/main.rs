//! `cargo xtask`: the project's developer commands, in Rust so they run
//! wherever cargo does (the rust-analyzer pattern).
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why),
//! 2 bad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod build_image;
mod cluster_config;
mod deps;
mod disk;
mod fuzz;
mod image_cache;
mod ledger;
mod powercut;
mod test_tier;
mod tier;
mod vm;

use vm::{cluster, e2e, qemu, smoke, vmtest};

use nimbus_testkit::httpd;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Nimbus developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect and change Nimbus disk images (GPT layout and A/B slot attributes).
    Disk {
        #[command(subcommand)]
        cmd: disk::DiskCmd,
    },
    /// Generate a release signing key pair (release.key, release.pub) in DIR.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Build a bootable Nimbus disk image (raw, qcow2, Vagrant box) and its update payload.
    BuildImage(build_image::BuildImage),
    /// Benchmarks: print a table, write it to docs/, compare with a baseline from the same run.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// The whole loop in QEMU: build N and N+1, publish N+1, boot N and let the guest's
    /// update-engine install N+1, reboot into it and mark it good.
    E2e {
        /// Keep target/nimbus/e2e afterwards (images, repo, console log).
        #[arg(long)]
        keep: bool,
    },
    /// A cluster in QEMU: etcd and a Docker swarm formed from cloud-config alone, a
    /// replicated service, and a rolling update under the etcd reboot lock, probed every
    /// second; prints `cluster: hosts=N final=... max_rebooting=N ...`.
    Cluster(cluster::ClusterArgs),
    /// An etcd cluster's TLS material and one user-data per host: a CA, per-host
    /// peer/client certificates, an operator's client certificate (rcgen, no shell-out).
    ClusterConfig(cluster_config::ClusterConfigArgs),
    /// Cut the power at every write and sync of an update (and of the boot's GPT writes)
    /// and check that the disk still boots a verified slot with an old-or-new GPT.
    Powercut {
        /// At least this many cut points (ops x variants of what landed).
        #[arg(long, default_value_t = 200)]
        points: usize,
    },
    /// Build the cargo-fuzz targets (nightly) and run each for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (manifest, descriptor, gpt, update_conf, cloud_config, payload).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Write the table to docs/fuzz.md.
        #[arg(long)]
        record: bool,
        /// address (nightly toolchain) or none (stable). Default: address
        /// when a nightly toolchain is installed, else none.
        #[arg(long)]
        sanitizer: Option<String>,
        /// Build at opt-level 1 instead of 3: about a minute less to build
        /// for a smoke run (the suite's), at a similar execution rate.
        #[arg(long)]
        quick_build: bool,
    },
    /// Boot an image under QEMU (TCG), serial console on stdout.
    Qemu(qemu::Qemu),
    /// The default tier's VM smoke, in one SeaBIOS guest life: 1.0.0 boots
    /// and is marked good, updates itself to 1.1.0 by delta, a release that
    /// fails its health check rolls back, a corrupted slot is refused.
    Smoke(smoke::Smoke),
    /// Run the default test tier (what `cargo test --workspace` runs), two
    /// test binaries at a time, one row per binary.
    Test(test_tier::Test),
    /// Run the VM tier (the tests marked `vm tier`), one row per test.
    Vmtest(vmtest::VmTest),
    /// Publish a built version into a static release repository: copy its payload and
    /// write the channel's next signed manifest (serial + 1).
    Release(Release),
    /// Install the Debian packages the build and the default test tier need
    /// (.ci/packages.txt).
    Deps {
        /// Only report what is missing; exit 1 if anything is.
        #[arg(long)]
        check: bool,
        /// Also what the VM tier needs (.ci/packages-vm.txt).
        #[arg(long)]
        vm: bool,
        /// Also what the benchmarks need (.ci/packages-bench.txt).
        #[arg(long)]
        bench: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Disk { cmd } => disk::run(cmd),
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Deps { check, vm, bench } => deps::run(check, vm, bench),
        Cmd::BuildImage(a) => build_image::run(a),
        Cmd::Bench { cmd } => bench::run(cmd),
        Cmd::Qemu(a) => qemu::run(a),
        Cmd::Smoke(a) => smoke::run(a),
        Cmd::Test(a) => test_tier::run(a),
        Cmd::Vmtest(a) => vmtest::run(a),
        Cmd::Release(a) => release(a),
        Cmd::E2e { keep } => e2e::run(keep),
        Cmd::Cluster(a) => cluster::run(a),
        Cmd::ClusterConfig(a) => cluster_config::run(&a).map(|()| ExitCode::SUCCESS),
        Cmd::Fuzz {
            seconds,
            targets,
            record,
            sanitizer,
            quick_build,
        } => fuzz::run(seconds, targets, record, sanitizer, quick_build),
        Cmd::Powercut { points } => powercut::run(points),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args)]
struct Release {
    /// The build's output directory, e.g. target/nimbus/1.2.0 (build.json + usr.img.zst).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// The repository root (channels/, payloads/); created if missing.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    #[arg(long, value_name = "NAME")]
    channel: String,
    /// Directory holding release.key (see `cargo xtask keygen`); repeat it
    /// for a threshold of keys. Every key signs the manifest and any new
    /// trust set.
    #[arg(long, value_name = "DIR", required = true)]
    key: Vec<PathBuf>,
    /// Rotate the trust set: add this public key (a release.pub). The key
    /// must sign too (pass its --key). Repeatable.
    #[arg(long, value_name = "PUB")]
    add_key: Vec<PathBuf>,
    /// Rotate the trust set: remove the key with this id. Repeatable.
    #[arg(long, value_name = "KEYID")]
    remove_key: Vec<String>,
    /// Rotate the trust set: distinct keys that must sign from now on.
    #[arg(long, value_name = "N")]
    threshold: Option<usize>,
    /// How long the manifest stays valid: clients refuse it afterwards.
    #[arg(long, default_value = "14d", value_parser = nimbus::updateconf::parse_duration)]
    expires: u64,
    /// Stage the rollout over this many hours from now (each host starts at its own point).
    #[arg(long, value_name = "H")]
    rollout_hours: Option<f64>,
    /// Kill switch: offer nothing above this version. It stays in force for
    /// later publishes on the channel until --clear-max-version.
    #[arg(long, value_name = "V", conflicts_with = "clear_max_version")]
    max_version: Option<semver::Version>,
    /// Remove the channel's kill switch.
    #[arg(long)]
    clear_max_version: bool,
}

fn release(a: Release) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let keys = a
        .key
        .iter()
        .map(|d| {
            nimbus::keys::ReleaseKey::load_dir(d)
                .with_context(|| format!("loading the release key from {}", d.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key_refs: Vec<&nimbus::keys::ReleaseKey> = keys.iter().collect();
    let rotation = if a.add_key.is_empty() && a.remove_key.is_empty() && a.threshold.is_none() {
        None
    } else {
        Some(nimbus_image::release::Rotation {
            add: a
                .add_key
                .iter()
                .map(|p| {
                    nimbus::keys::load_public(p)
                        .with_context(|| format!("--add-key {}", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            remove: a
                .remove_key
                .iter()
                .map(|s| {
                    s.parse::<nimbus::keys::KeyId>()
                        .map_err(|e| anyhow::anyhow!("--remove-key: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            threshold: a.threshold,
        })
    };
    let rollout_secs = match a.rollout_hours {
        Some(h) if !(h.is_finite() && h > 0.0) => {
            anyhow::bail!("--rollout-hours {h}: must be a positive number of hours")
        }
        Some(h) => Some((h * 3600.0).round() as u64),
        None => None,
    };
    let m = nimbus_image::release::publish(&nimbus_image::release::PublishOptions {
        from: &a.from,
        repo: &a.repo,
        channel: &a.channel,
        keys: &key_refs,
        rotation,
        now: chrono::Utc::now(),
        expires_secs: a.expires,
        rollout_secs,
        max_version: a.max_version,
        clear_max_version: a.clear_max_version,
    })?;
    let newest = m
        .releases
        .last()
        .map(|r| r.version.to_string())
        .unwrap_or_default();
    println!(
        "{}: channel {} serial {} offers {} (newest {newest}), expires {}",
        nimbus_image::release::manifest_path(&a.repo, &a.channel).display(),
        m.channel,
        m.serial,
        m.releases.len(),
        m.expires.to_rfc3339()
    );
    let t = nimbus_image::release::current_trust(&a.repo, &a.from)?;
    println!(
        "{}: trust set {}",
        a.repo.join("trust").display(),
        t.summary()
    );
    Ok(ExitCode::SUCCESS)
}

fn keygen(out: &std::path::Path) -> anyhow::Result<ExitCode> {
    let key = nimbus::keys::ReleaseKey::generate()?;
    key.write_to_dir(out)?;
    println!("{}", key.id);
    eprintln!(
        "wrote {} and {} (key id {})",
        out.join(nimbus::keys::SECRET_FILE).display(),
        out.join(nimbus::keys::PUBLIC_FILE).display(),
        key.id
    );
    Ok(ExitCode::SUCCESS)
}

/// "3G", "512M", "64MiB", "4096" -> bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional K/M/G/T suffix"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("3G"), Ok(3 << 30));
        assert_eq!(super::parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("12X").is_err());
        assert!(super::parse_size("G").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}
