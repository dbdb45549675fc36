//! `update-engine`: the daemon every Nimbus host runs, and its host mode
//! for image files and air-gapped installs.
//!
//! Exit codes: 0 success, 1 unexpected failure, 2 configuration or command
//! line, 3 network, 4 verification, 5 disk, 6 refused by policy, 7 cancelled.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nimbus_updater::api::{self, Command, Request, Response};
use nimbus_updater::engine::{Engine, Host, Options, Shared};
use nimbus_updater::error::UpdateError;

#[derive(Parser)]
#[command(
    name = "update-engine",
    version,
    about = "Nimbus update engine: follow a channel, install into the passive USR slot"
)]
struct Cli {
    /// The root holding etc/, usr/share/nimbus/ and var/lib/nimbus/.
    #[arg(long, default_value = "/", global = true)]
    root: PathBuf,
    /// Host mode: update this disk image instead of the running system; the
    /// slot the boot rule would pick counts as booted.
    #[arg(long, value_name = "IMG", global = true)]
    disk: Option<PathBuf>,
    /// Check and install once, then exit (exit code says how it went).
    #[arg(long)]
    once: bool,
    /// With --once: print the final status as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// The API socket (default: ROOT/run/nimbus/update-engine.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The metrics socket (default: ROOT/run/nimbus/metrics.promsock).
    #[arg(long, value_name = "PATH")]
    metrics_socket: Option<PathBuf>,
    /// Also serve Flatcar's D-Bus interface (com.coreos.update1) on this
    /// bus: `system`, or an address (unix:path=...).
    #[arg(long, value_name = "BUS")]
    dbus: Option<nimbus_updater::dbus::Bus>,
    /// Seconds between checks (a tenth of it is random jitter).
    #[arg(long, default_value_t = 3600)]
    interval: u64,
    /// Seconds before the first check after start.
    #[arg(long, default_value_t = 60)]
    first_check: u64,
    /// Give up on a server that sends nothing for this many seconds.
    #[arg(long, default_value_t = 30, global = true)]
    read_timeout: u64,
    #[arg(long, default_value_t = 10, global = true)]
    connect_timeout: u64,
    /// Give up on a manifest or signature file not complete after this
    /// many seconds, however slowly bytes keep coming.
    #[arg(long, default_value_t = 60, global = true)]
    fetch_deadline: u64,
    /// Run this instead of `systemctl reboot` when policy allows a reboot.
    /// Host mode never reboots without it, and exits after it succeeds
    /// (the host "went down").
    #[arg(long, value_name = "CMD")]
    reboot_command: Option<String>,
    /// Seconds between reboot-policy steps (window, lock, release after boot).
    #[arg(long, default_value_t = 60)]
    reboot_poll: u64,
    #[command(subcommand)]
    cmd: Option<Sub>,
}

#[derive(Subcommand)]
enum Sub {
    /// Install a payload from a file, verified against a signed manifest
    /// exactly as an online update is (air-gapped hosts).
    ApplyFile {
        payload: PathBuf,
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// Detached signatures (default: MANIFEST.sig).
        #[arg(long, value_name = "FILE")]
        signatures: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    tracing::debug!(
        "update-engine {} {}",
        env!("CARGO_PKG_VERSION"),
        nimbus::BUILD_TAG
    );
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(kind = e.kind(), "{e}");
            eprintln!("update-engine: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, UpdateError> {
    let host = match &cli.disk {
        Some(d) => Host::image(&cli.root, d)?,
        None => Host::running(&cli.root)?,
    };
    let opts = Options {
        connect_timeout: Duration::from_secs(cli.connect_timeout),
        read_timeout: Duration::from_secs(cli.read_timeout),
        fetch_deadline: Duration::from_secs(cli.fetch_deadline.max(1)),
    };
    let shared = Arc::new(Shared::new());
    let mut engine = Engine::new(host, &opts, shared.clone())?;
    match &cli.cmd {
        Some(Sub::ApplyFile {
            payload,
            manifest,
            signatures,
        }) => {
            let sigs = signatures
                .clone()
                .unwrap_or_else(|| nimbus::repo::sig_path(manifest));
            let r = engine.apply_file(payload, manifest, &sigs);
            return finish(&engine, r.map(Some), cli.json);
        }
        None if cli.once => {
            let r = engine.update();
            return finish(&engine, r, cli.json);
        }
        None => {}
    }
    daemon(cli, engine, shared)
}

fn finish(
    engine: &Engine,
    r: Result<Option<semver::Version>, UpdateError>,
    json: bool,
) -> Result<ExitCode, UpdateError> {
    let code = match &r {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            engine.report_error(e);
            eprintln!("update-engine: {e}");
            ExitCode::from(e.exit_code())
        }
    };
    let st = engine.shared().snapshot();
    if json {
        println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
    } else {
        match (&r, &st.new_version) {
            (Ok(Some(v)), _) => println!(
                "{v} installed into the passive slot; {}",
                st.note.clone().unwrap_or_default()
            ),
            (Ok(None), _) => println!("{}: {}", st.state, st.note.clone().unwrap_or_default()),
            (Err(_), _) => {}
        }
        if let Some(rb) = &st.rollback {
            println!(
                "rolled back: {} {} was given up: {}",
                rb.failed_slot,
                rb.failed_version.as_deref().unwrap_or("(unknown version)"),
                rb.reason
            );
        }
    }
    Ok(code)
}

fn jitter(secs: u64) -> Duration {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    let frac = u32::from_le_bytes(b) as f64 / u32::MAX as f64;
    Duration::from_secs_f64(secs as f64 * (0.9 + 0.2 * frac))
}

/// Carry out a reboot decision. True when the process should end (host
/// mode: the simulated host went down).
fn reboot(cli: &Cli, engine: &Engine) -> bool {
    let cmd = match (&cli.reboot_command, engine.host().host_mode) {
        (Some(c), _) => c.clone(),
        (None, false) => "systemctl reboot".to_string(),
        (None, true) => {
            tracing::info!("host mode: not rebooting (no --reboot-command)");
            return false;
        }
    };
    tracing::info!("rebooting into the new version: running {cmd:?}");
    match std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .status()
    {
        Ok(s) if s.success() => engine.host().host_mode,
        Ok(s) => {
            tracing::error!("reboot command {cmd:?} failed: {s}");
            false
        }
        Err(e) => {
            tracing::error!("reboot command {cmd:?}: {e}");
            false
        }
    }
}

/// One reboot-policy step; true when the process should end.
fn reboot_tick(cli: &Cli, engine: &mut Engine) -> bool {
    match engine.reboot_step() {
        Ok(nimbus_updater::policy::Decision::Reboot) => reboot(cli, engine),
        Ok(nimbus_updater::policy::Decision::Wait { why, .. }) => {
            tracing::info!("reboot waits: {why}");
            false
        }
        Ok(_) => false,
        Err(e) => {
            engine.report_error(&e);
            false
        }
    }
}

fn daemon(cli: Cli, mut engine: Engine, shared: Arc<Shared>) -> Result<ExitCode, UpdateError> {
    nimbus_updater::iolimit::sweep_stale();
    let sock = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.root.join(api::SOCKET_PATH));
    let (tx, rx) = channel::<Command>();
    // Updates go on without the bus: a D-Bus that is down or refuses the
    // name costs FLUO and exporters their view, never the host its updates.
    let _dbus = match &cli.dbus {
        Some(bus) => match nimbus_updater::dbus::serve(bus, shared.clone(), tx.clone()) {
            Ok(served) => Some(served),
            Err(e) => {
                tracing::error!("{e}; going on without the D-Bus interface");
                None
            }
        },
        None => None,
    };
    api::serve(&sock, shared.clone(), tx).map_err(|e| UpdateError::Io {
        path: sock.clone(),
        source: e,
    })?;
    let metrics_sock = cli
        .metrics_socket
        .clone()
        .unwrap_or_else(|| cli.root.join(api::METRICS_SOCKET_PATH));
    api::serve_metrics(&metrics_sock, shared.clone()).map_err(|e| UpdateError::Io {
        path: metrics_sock.clone(),
        source: e,
    })?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(
        "update-engine {} on {} (booted partition {}, running {}), API at {}",
        env!("CARGO_PKG_VERSION"),
        engine.host().disk.display(),
        engine.host().booted,
        engine.running(),
        sock.display()
    );
    let mut next = Instant::now() + Duration::from_secs(cli.first_check);
    let mut failures = 0u32;
    // First thing after a boot: give back a reboot lock taken before it.
    if reboot_tick(&cli, &mut engine) {
        return Ok(ExitCode::SUCCESS);
    }
    let poll = Duration::from_secs(cli.reboot_poll.max(1));
    let mut next_tick = Instant::now() + poll;
    loop {
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + poll;
            if reboot_tick(&cli, &mut engine) {
                return Ok(ExitCode::SUCCESS);
            }
        }
        let wait = next
            .min(next_tick)
            .saturating_duration_since(Instant::now());
        let (req, reply) = match rx.recv_timeout(wait) {
            Ok(c) => (c.request, Some(c.reply)),
            Err(RecvTimeoutError::Timeout) if Instant::now() >= next => {
                (Request::Apply { wait: false }, None)
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(ExitCode::SUCCESS),
        };
        let scheduled = reply.is_none();
        let result: Result<String, UpdateError> = match req {
            Request::Check => engine.check().map(|c| match c.choice {
                nimbus_updater::choose::Choice::Offer(r) => format!("{} is available", r.version),
                nimbus_updater::choose::Choice::Nothing(w) => w,
                nimbus_updater::choose::Choice::Wait { reason, .. } => reason,
            }),
            Request::Apply { .. } => engine.update().map(|v| match v {
                Some(v) => {
                    // Judge the reboot at once rather than at the next poll.
                    next_tick = Instant::now();
                    format!("{v} installed; reboot to use it")
                }
                None => engine
                    .shared()
                    .snapshot()
                    .note
                    .unwrap_or_else(|| "nothing to install".into()),
            }),
            Request::SetChannel {
                name,
                allow_downgrade,
            } => engine.set_channel(&name, allow_downgrade),
            Request::Rollback | Request::MarkGood => {
                next_tick = Instant::now();
                if matches!(req, Request::Rollback) {
                    engine.rollback()
                } else {
                    engine.mark_good()
                }
            }
            Request::ResetStatus => {
                next_tick = Instant::now();
                engine.reset_status()
            }
            Request::Status | Request::Watch | Request::Cancel => Ok(String::new()),
        };
        if let Err(e) = &result {
            engine.report_error(e);
        }
        if scheduled {
            match &result {
                Ok(_) => {
                    failures = 0;
                    next = Instant::now() + jitter(cli.interval);
                }
                Err(_) => {
                    // Capped exponential backoff: 1, 2, 4 ... minutes, at most the interval.
                    failures = failures.saturating_add(1);
                    let secs = (60u64 << failures.min(10).saturating_sub(1)).min(cli.interval);
                    next = Instant::now() + jitter(secs);
                    tracing::info!("next attempt in about {secs} s");
                }
            }
        }
        if let Some(reply) = reply {
            let st = engine.shared().snapshot();
            let _ = reply.send(match &result {
                Ok(m) => Response::ok(m.clone(), st),
                Err(e) => Response::err(e, st),
            });
        }
    }
}
