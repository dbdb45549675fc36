//! `nimbus-fleetlock`: serve the FleetLock protocol (`POST /v1/pre-reboot`,
//! `POST /v1/steady-state`, `GET /metrics`) with each group's semaphore in
//! etcd v3 where airlock keeps it.
//!
//! Exit codes: 0 stopped, 2 configuration, 1 the listener failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nimbus_fleetlock::config::Config;

#[derive(Parser)]
#[command(
    name = "nimbus-fleetlock",
    version,
    about = "A FleetLock server (Zincati's reboot lock) over etcd v3, in airlock's format"
)]
struct Cli {
    /// The configuration (airlock's TOML shape: [service], [etcd3], [lock]).
    #[arg(long, short, default_value = "/etc/nimbus/fleetlock.toml")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nimbus-fleetlock: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "{}: listen on {}, etcd {}, groups {}",
            cli.config.display(),
            cfg.listen,
            cfg.etcd.endpoints.join(","),
            cfg.groups
                .iter()
                .map(|(g, n)| format!("{g}={n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::SUCCESS;
    }
    match nimbus_fleetlock::http::start(&cfg) {
        Ok(h) => {
            tracing::info!(
                "serving FleetLock on {} (groups: {})",
                h.addr,
                cfg.groups.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            h.wait();
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("nimbus-fleetlock: {e}");
            ExitCode::from(1)
        }
    }
}
