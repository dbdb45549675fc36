//! `nimbus-swarm`: join the swarm cloud-config described (run by
//! nimbus-swarm.service at boot), and the drain / activate steps
//! update-engine runs as its default pre-reboot and post-good hooks.
//!
//! Exit codes: 0 done, 1 failed (the message says why), 2 configuration.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use nimbus_swarm::{Docker, RealWaiter, Shared, SwarmError};

#[derive(Parser)]
#[command(
    name = "nimbus-swarm",
    version,
    about = "Docker swarm membership from cloud-config, and the update drain hooks"
)]
struct Cli {
    /// The root holding etc/nimbus/ (swarm.conf, update.conf for etcd).
    #[arg(long, default_value = "/", global = true)]
    root: PathBuf,
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(Subcommand)]
enum Sub {
    /// Start or join the swarm /etc/nimbus/swarm.conf describes (no-op when
    /// this host is a member already).
    Join {
        /// Give up after this many seconds without a token or a manager.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// On a manager, for the host's life: promote the workers swarm.conf's
    /// MANAGERS names once each asked through etcd with its own node ID.
    Promote {
        /// Seconds between looks.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
    },
    /// Set this node to drain and wait until its tasks run elsewhere (the
    /// pre-reboot hook; update-engine stops it at HOOK_TIMEOUT).
    Drain,
    /// Wait for the swarm and make this node active again (the post-good
    /// hook).
    Activate {
        /// Seconds to wait for the node to be back in the swarm (default:
        /// NIMBUS_HOOK_TIMEOUT less 10 s, or 300).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

struct DockerCli;

impl Docker for DockerCli {
    fn run(&mut self, args: &[&str]) -> Result<String, SwarmError> {
        let out = Command::new("docker")
            .args(args)
            .output()
            .map_err(|e| SwarmError::Docker {
                args: args.join(" "),
                reason: format!("cannot run docker: {e}"),
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(SwarmError::Docker {
                args: redact(args),
                reason: format!("{}: {}", out.status, err.trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn join_swarm(&mut self, req: &nimbus_swarm::engine::JoinRequest) -> Result<(), SwarmError> {
        // A join waits for the manager to accept the node: give it time.
        nimbus_swarm::engine::Engine::new(
            std::path::Path::new(nimbus_swarm::engine::SOCKET),
            Duration::from_secs(120),
        )
        .join(req)
    }
}

/// A join token lets a machine into the swarm: never in a log line.
fn redact(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.starts_with("SWMTKN-") {
                "SWMTKN-…"
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct Etcd(nimbus_etcd::lock::LockClient);

impl Shared for Etcd {
    fn get(&mut self, key: &str) -> Result<Option<String>, SwarmError> {
        let v = self
            .0
            .get_value(key)
            .map_err(|e| SwarmError::Etcd(e.to_string()))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }
    fn put(&mut self, key: &str, value: &str) -> Result<(), SwarmError> {
        self.0
            .put_value(key, value.as_bytes())
            .map_err(|e| SwarmError::Etcd(e.to_string()))
    }
    fn create(&mut self, key: &str, value: &str) -> Result<bool, SwarmError> {
        self.0
            .cas_value(key, value.as_bytes(), 0)
            .map_err(|e| SwarmError::Etcd(e.to_string()))
    }
    fn delete(&mut self, key: &str) -> Result<(), SwarmError> {
        self.0
            .delete_value(key)
            .map_err(|e| SwarmError::Etcd(e.to_string()))
    }
}

/// swarm.conf, or the exit code for a missing or bad one (2).
fn load_conf(root: &std::path::Path) -> Result<nimbus_swarm::SwarmConf, ExitCode> {
    let path = root.join(nimbus::paths::SWARM_CONF);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        eprintln!("nimbus-swarm: {}: {e}", path.display());
        ExitCode::from(2)
    })?;
    nimbus_swarm::parse_conf(&path.display().to_string(), &text).map_err(|e| {
        eprintln!("nimbus-swarm: {e}");
        ExitCode::from(2)
    })
}

fn etcd(root: &std::path::Path) -> anyhow::Result<Etcd> {
    let conf = nimbus::updateconf::UpdateConf::load_layered(root)?;
    let opts = nimbus_etcd::options_from_conf(&conf)
        .map_err(|e| anyhow::anyhow!("{}: {e}", nimbus::updateconf::ETC_PATH))?;
    Ok(Etcd(nimbus_etcd::lock::LockClient::new(opts)?))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut docker = DockerCli;
    let mut w = RealWaiter::new();
    match cli.cmd {
        Sub::Promote { interval } => {
            let conf = match load_conf(&cli.root) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if conf.managers.is_empty() {
                println!("no MANAGERS in swarm.conf: nobody to promote");
                return Ok(ExitCode::SUCCESS);
            }
            let mut shared = etcd(&cli.root)?;
            let mut said = String::new();
            // Quiet rounds back off to a minute: each look spawns the
            // docker CLI, which a 1-vCPU host feels every few seconds.
            let mut wait = interval;
            // A loop for the life of the host: a manager rebuilt later
            // joins as a worker and asks again. One look each `interval`
            // (a `docker info`, and a `docker node ls` on a manager).
            loop {
                let now = match nimbus_swarm::promote_named(&conf, &mut docker, &mut shared) {
                    Ok(p) if p.is_empty() => String::new(),
                    Ok(p) => format!("promoted to manager: {}", p.join(", ")),
                    Err(e) => format!("cannot promote yet: {e}"),
                };
                if !now.is_empty() && now != said {
                    println!("{now}");
                    tracing::info!("{now}");
                }
                wait = if now.is_empty() {
                    wait.saturating_mul(2).min(interval.max(60))
                } else {
                    interval
                };
                said = now;
                std::thread::sleep(Duration::from_secs(wait));
            }
        }
        Sub::Join { timeout } => {
            let conf = match load_conf(&cli.root) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let mut tokens = etcd(&cli.root)?;
            let r = nimbus_swarm::join(
                &conf,
                &mut docker,
                &mut tokens,
                &mut w,
                Duration::from_secs(timeout),
            )?;
            tracing::info!("swarm: {r:?} as {}", conf.role());
            println!(
                "{}",
                match r {
                    nimbus_swarm::Joined::AlreadyMember =>
                        "already a member of the swarm".to_string(),
                    nimbus_swarm::Joined::Initialised => "swarm initialised".to_string(),
                    nimbus_swarm::Joined::Joined { via } =>
                        format!("joined the swarm as a {} via {via}", conf.role()),
                }
            );
        }
        Sub::Drain => {
            nimbus_swarm::drain(&mut docker, &mut w)?;
        }
        Sub::Activate { timeout } => {
            let limit = timeout.unwrap_or_else(|| {
                std::env::var("NIMBUS_HOOK_TIMEOUT")
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|s| s.saturating_sub(10).max(10))
                    .unwrap_or(300)
            });
            nimbus_swarm::activate(&mut docker, &mut w, Duration::from_secs(limit))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            // stdout: update-engine shows a hook's last line as its reason.
            println!("nimbus-swarm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
