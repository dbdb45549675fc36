//! `cargo xtask bench footprint`: what an idle Nimbus host costs, as CoreOS
//! advertised it (memory used after boot, the size of what an update
//! fetches). Boots the default image in QEMU (1 GiB, 2 vCPUs, SeaBIOS)
//! with two user-datas: a single host (root's key only) and a cluster
//! host's configuration (`cargo xtask cluster-config` for a one-member
//! cluster: etcd over TLS, a swarm manager, update-engine's etcd lock).
//! Each boot waits until the host is idle (boot marked good, no systemd
//! job queued, then a settle), then reads memory two ways: MemTotal -
//! MemAvailable, and the RSS of the largest processes. Medians of `runs`
//! boots per configuration. Prints
//!
//! `footprint: single_idle_mib=N cluster_idle_mib=N usr_mib=N payload_mib=N iso_mib=N top=NAME:RSS,...`
//!
//! and writes docs/bench-footprint.md. Nothing here is asserted: the
//! issue's targets are printed beside the figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster_config::{self, Member, Site};
use crate::vm::e2e::{self, Ssh};
use crate::vm::qemu;

/// After the host is idle by systemd's account: long enough for the
/// one-shot work of a first boot (etcd's first snapshot, dockerd's
/// start-up allocations) to be given back.
const SETTLE: Duration = Duration::from_secs(60);

/// One idle host, measured.
struct Sample {
    used_mib: u64,
    /// Process name -> RSS in MiB, every process.
    rss: BTreeMap<String, u64>,
}

impl Sample {
    /// The RSS of the `n` largest processes, summed.
    fn top_sum(&self, n: usize) -> u64 {
        let mut v: Vec<u64> = self.rss.values().copied().collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.iter().take(n).sum()
    }
}

/// `/proc/meminfo` and `ps` output as a sample; processes of one name
/// (dockerd's children, several sshd) add up.
fn parse_sample(meminfo: &str, ps: &str) -> anyhow::Result<Sample> {
    let get = |k: &str| -> anyhow::Result<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("/proc/meminfo has no {k}"))
    };
    let used = get("MemTotal:")?
        .checked_sub(get("MemAvailable:")?)
        .context("MemAvailable above MemTotal")?;
    let mut rss = BTreeMap::new();
    for l in ps.lines() {
        let mut f = l.split_whitespace();
        let (Some(kib), Some(name)) = (f.next(), f.next()) else {
            continue;
        };
        let Ok(kib) = kib.parse::<u64>() else {
            continue;
        };
        *rss.entry(name.to_string()).or_insert(0) += kib;
    }
    Ok(Sample {
        used_mib: used / 1024,
        rss: rss.into_iter().map(|(k, v)| (k, v / 1024)).collect(),
    })
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Boot `image` (a copy) with `user_data`, wait until idle, sample, stop.
fn boot_and_sample(
    work: &Path,
    image: &Path,
    user_data: &Path,
    key: &Path,
    tag: &str,
) -> anyhow::Result<Sample> {
    let disk = work.join(format!("{tag}.raw"));
    let st = nimbus_testkit::proc::status(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(image)
            .arg(&disk),
        Duration::from_secs(300),
    )?;
    if !st.success() {
        bail!("copying {} failed ({st})", image.display());
    }
    let ssh = Ssh::new(
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        key.to_path_buf(),
    );
    let log = work.join(format!("{tag}.console"));
    let opts = qemu::Qemu {
        memory: 1024,
        timeout: 1200,
        user_data: Some(user_data.to_path_buf()),
        ..qemu::Qemu::harness(&disk, &log, ssh.port)
    };
    let mut vm = qemu::Vm::spawn(&opts)?;
    let t = Instant::now();
    vm.wait_for(
        &e2e::marked_good("USR-A", "1.0.0"),
        0,
        Duration::from_secs(600),
    )?;
    // Idle by systemd's account: started up, nothing queued.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let state = ssh.run_ok(
            "systemctl is-system-running; systemctl list-jobs --no-legend | wc -l",
            Duration::from_secs(120),
        );
        // is-system-running exits non-zero when degraded: run_ok then
        // errors, and the host is as idle as it will get.
        let idle = match &state {
            Ok(s) => {
                let mut l = s.lines();
                matches!(l.next(), Some("running")) && l.next() == Some("0")
            }
            Err(e) => format!("{e:#}").contains("degraded"),
        };
        if idle {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{tag}: not idle 300 s after boot ({state:?}); console:\n{}",
                vm.tail()
            );
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    std::thread::sleep(SETTLE);
    let meminfo = ssh.run_ok("cat /proc/meminfo", Duration::from_secs(60))?;
    let ps = ssh.run_ok("ps -e -o rss=,comm=", Duration::from_secs(60))?;
    let s = parse_sample(&meminfo, &ps)?;
    eprintln!(
        "footprint: {tag}: idle {} s after start, {} MiB used, top {} MiB",
        t.elapsed().as_secs(),
        s.used_mib,
        s.top_sum(5)
    );
    vm.stop();
    let _ = std::fs::remove_file(&disk);
    Ok(s)
}

pub fn bench_footprint(runs: u32) -> anyhow::Result<ExitCode> {
    let root = crate::build_image::workspace_root();
    let work = root.join("target/nimbus/bench/footprint");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let key = work.join("id_ed25519");
    let st = nimbus_testkit::proc::status(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "nimbus-footprint",
                "-f",
            ])
            .arg(&key),
        Duration::from_secs(30),
    )
    .context("ssh-keygen (openssh-client)")?;
    if !st.success() {
        bail!("ssh-keygen failed ({st})");
    }
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
    let pubkey = pubkey.trim();

    // The default image: what `cargo xtask build-image` makes.
    let (out, _) = e2e::build(&work, "1.0.0", &[])?;
    let bj: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("build.json"))?)?;
    let mib = |v: &serde_json::Value| v.as_u64().map(|b| b as f64 / (1 << 20) as f64);
    let usr_mib = mib(&bj["usr_data_size"]).context("build.json: usr_data_size")?;
    let payload_mib =
        mib(&bj["payload"]["compressed_size"]).context("build.json: payload.compressed_size")?;
    let image = out.join("nimbus.raw");

    let single = work.join("single.yaml");
    std::fs::write(
        &single,
        format!(
            "#cloud-config\nusers:\n  - name: root\n    ssh_authorized_keys:\n      - {pubkey}\n"
        ),
    )?;
    // One member at the address QEMU's user network gives the guest.
    let members = vec![Member {
        name: "h1".into(),
        addr: "10.0.2.15".parse()?,
    }];
    let pki = cluster_config::make_pki(&members, 30, false)?;
    let site = Site {
        ssh_keys: vec![pubkey.to_string()],
        group: "stable".into(),
        ..Site::default()
    };
    let cluster = work.join("cluster.yaml");
    std::fs::write(
        &cluster,
        cluster_config::user_data(&members, 0, &pki, &site)?,
    )?;

    let mut results: Vec<(&str, Vec<Sample>)> = Vec::new();
    for (tag, ud) in [("single", &single), ("cluster", &cluster)] {
        let mut v = Vec::new();
        for i in 0..runs {
            v.push(boot_and_sample(
                &work,
                &image,
                ud,
                &key,
                &format!("{tag}-{i}"),
            )?);
        }
        results.push((tag, v));
    }
    let used = |tag: &str| -> u64 {
        let mut v: Vec<u64> = results
            .iter()
            .filter(|(t, _)| *t == tag)
            .flat_map(|(_, s)| s.iter().map(|s| s.used_mib))
            .collect();
        median(&mut v)
    };
    // Each process's median RSS over a configuration's boots.
    let per_process = |tag: &str| -> Vec<(String, u64)> {
        let samples: Vec<&Sample> = results
            .iter()
            .filter(|(t, _)| *t == tag)
            .flat_map(|(_, s)| s.iter())
            .collect();
        let mut names: Vec<&String> = samples.iter().flat_map(|s| s.rss.keys()).collect();
        names.sort();
        names.dedup();
        let mut out: Vec<(String, u64)> = names
            .into_iter()
            .map(|n| {
                let mut v: Vec<u64> = samples
                    .iter()
                    .map(|s| s.rss.get(n).copied().unwrap_or(0))
                    .collect();
                (n.clone(), median(&mut v))
            })
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    };
    let single_top = per_process("single");
    let cluster_top = per_process("cluster");
    let top: Vec<String> = single_top
        .iter()
        .take(3)
        .map(|(n, r)| format!("{n}:{r}"))
        .collect();
    let line = format!(
        "footprint: single_idle_mib={} cluster_idle_mib={} usr_mib={usr_mib:.0} payload_mib={payload_mib:.1} iso_mib=none top={}",
        used("single"),
        used("cluster"),
        top.join(",")
    );

    let mut t = String::new();
    writeln!(t, "# Footprint: an idle host's memory, USR and the payload")?;
    writeln!(t)?;
    writeln!(
        t,
        "`cargo xtask bench footprint` on {}, QEMU TCG, guests of 1 GiB and 2 vCPUs (SeaBIOS), \
         the default image (`cargo xtask build-image`); medians of {runs} boots per configuration. \
         Memory used is MemTotal - MemAvailable once the host is idle (boot marked good, no \
         systemd job queued, then {} s); RSS per process name (processes of one name added).",
        crate::bench::machine(),
        SETTLE.as_secs()
    )?;
    writeln!(t)?;
    writeln!(t, "```\n{line}\n```")?;
    writeln!(t)?;
    writeln!(t, "| figure | measured | target |")?;
    writeln!(t, "|---|---|---|")?;
    writeln!(
        t,
        "| single host idle, MiB used | {} | 114 |",
        used("single")
    )?;
    writeln!(
        t,
        "| cluster host idle (etcd, swarm manager), MiB used | {} | 200 |",
        used("cluster")
    )?;
    writeln!(t, "| USR (erofs data), MiB | {usr_mib:.0} | 600 |")?;
    writeln!(t, "| update payload (zstd), MiB | {payload_mib:.1} | 170 |")?;
    writeln!(t, "| install ISO, MiB | none yet | 300 |")?;
    for (tag, list) in [("single host", &single_top), ("cluster host", &cluster_top)] {
        writeln!(t)?;
        writeln!(
            t,
            "What each process costs on the {tag} (median RSS, MiB; the 12 largest):"
        )?;
        writeln!(t)?;
        writeln!(t, "| process | RSS MiB |")?;
        writeln!(t, "|---|---|")?;
        for (n, r) in list.iter().take(12) {
            writeln!(t, "| {n} | {r} |")?;
        }
    }
    for (tag, samples) in &results {
        let used: Vec<String> = samples.iter().map(|s| s.used_mib.to_string()).collect();
        let tops: Vec<String> = samples.iter().map(|s| s.top_sum(8).to_string()).collect();
        writeln!(t)?;
        writeln!(
            t,
            "{tag}: MiB used per boot {}; RSS of the 8 largest processes per boot {}.",
            used.join(", "),
            tops.join(", ")
        )?;
    }
    std::fs::write(root.join("docs/bench-footprint.md"), &t)?;
    println!("{t}");
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_adds_processes_of_one_name_and_reads_used_memory() {
        let meminfo = "MemTotal:        1000000 kB\nMemFree:  1 kB\nMemAvailable:     800000 kB\n";
        let ps = "  51200 dockerd\n 10240 sshd\n 10240 sshd\n  junk\n 2048 etcd\n";
        let s = parse_sample(meminfo, ps).unwrap();
        assert_eq!(s.used_mib, 195);
        assert_eq!(s.rss["sshd"], 20);
        assert_eq!(s.rss["dockerd"], 50);
        assert_eq!(s.top_sum(2), 70);
        assert!(parse_sample("MemTotal: 1 kB\n", ps).is_err());
        assert_eq!(median(&mut [5, 1, 9]), 5);
    }
}
