//! `updatectl`: talk to update-engine over its local socket.
//!
//! Exit codes: 0 success, 1 the engine reported a failure it did not
//! classify, 2 bad command line, 3 network, 4 verification, 5 disk,
//! 6 refused by policy (e.g. a downgrade without --allow-downgrade),
//! 7 cancelled, 69 update-engine is not reachable, 77 the request needs
//! root or the nimbus-admin group.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nimbus_updater::api::{Client, Request, Response, SOCKET_PATH};
use nimbus_updater::status::Status;

#[derive(Parser)]
#[command(
    name = "updatectl",
    version,
    about = "Control the Nimbus update engine"
)]
struct Cli {
    /// update-engine's socket (default: ROOT/run/nimbus/update-engine.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// State, versions, progress and the last error.
    Status,
    /// Ask the server now whether a new version is offered (installs nothing).
    Check,
    /// Check and install now.
    Update {
        /// Stay until the update finished, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Show the channel, or switch to NAME.
    Channel {
        name: Option<String>,
        /// Allow switching to a channel whose newest version is older than the running one.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// The A/B slots: priority, tries, successful, version.
    Slots,
    /// The trusted release keys and threshold: update-engine's set, the
    /// one stage 1 booted with, and what is on the ESP for the next boot.
    Trust,
    /// update-engine's Prometheus metrics (the text its metrics socket
    /// serves; any user may read them).
    Metrics {
        /// The metrics socket (default: ROOT/run/nimbus/metrics.promsock).
        #[arg(long, value_name = "PATH")]
        metrics_socket: Option<PathBuf>,
    },
    /// Boot the other slot next (if it is bootable).
    Rollback,
    /// Mark the booted slot good.
    MarkGood,
    /// Stop a running download.
    Cancel,
    /// The cluster reboot lock in etcd (talks to etcd directly, not to update-engine).
    Lock {
        #[command(subcommand)]
        cmd: LockCmd,
        /// etcd endpoint (default: ETCD_ENDPOINTS from update.conf).
        #[arg(long, value_name = "URL", global = true)]
        endpoint: Option<String>,
        /// Reboot group (default: REBOOT_GROUP from update.conf).
        #[arg(long, value_name = "G", global = true)]
        group: Option<String>,
    },
    /// If this host's etcd member leads its cluster, hand leadership to
    /// another member (the pre-reboot hook 60-etcd-leader; talks to etcd,
    /// with update.conf's TLS and credentials).
    EtcdStepDown {
        /// This host's member (its client URL).
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:2379")]
        endpoint: String,
    },
}

#[derive(Subcommand)]
enum LockCmd {
    /// Slots, maximum and holders.
    Status,
    /// Remove MACHINE-ID from the holders (a host that will not come back).
    Unlock { machine_id: String },
    /// Let N hosts reboot at once.
    SetMax { n: i64 },
}

const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    // `updatectl status | head -3`: end on a closed pipe as Unix tools do,
    // not with a panic in println! (Rust ignores SIGPIPE by default).
    // SAFETY: first thing in main, no other thread yet; only restores the
    // default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if std::env::var_os("NIMBUS_SHOW_BUILD").is_some() {
        eprintln!(
            "updatectl {} {}",
            env!("CARGO_PKG_VERSION"),
            nimbus::BUILD_TAG
        );
    }
    let client = Client::new(
        cli.socket
            .clone()
            .unwrap_or_else(|| cli.root.join(SOCKET_PATH)),
    );
    match run(&cli, &client) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("updatectl: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

fn answer(cli: &Cli, r: &Response) -> ExitCode {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
    } else if let Some(m) = r.message.as_deref().filter(|m| !m.is_empty()) {
        println!("{m}");
    }
    match &r.error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            if !cli.json {
                eprintln!("updatectl: {} ({})", e.message, e.kind);
            }
            ExitCode::from(e.exit_code.max(1))
        }
    }
}

fn print_trust(s: &Status) {
    let Some(t) = &s.trust else {
        println!("trust: not known yet (update-engine is starting)");
        return;
    };
    println!(
        "update-engine: trust set version {}, {} of {} key(s): {}",
        t.usr.version,
        t.usr.threshold,
        t.usr.keys.len(),
        t.usr.keys.join(", ")
    );
    println!(
        "               built into USR: version {}; the booted slot is valid up to version {}",
        t.usr_builtin_version, t.active_version
    );
    match &t.stage1 {
        Some(s1) => println!(
            "stage 1:       trust set version {}, {} of {} key(s): {}",
            s1.version,
            s1.threshold,
            s1.keys.len(),
            s1.keys.join(", ")
        ),
        None => println!("stage 1:       not known (no nimbus.trust= on the kernel command line)"),
    }
    match t.esp_version {
        Some(v) => println!(
            "ESP:           rotations up to version {v} (stage 1 uses them from the next boot)"
        ),
        None => println!("ESP:           not read yet (read once the booted slot is marked good)"),
    }
    if let Some(e) = &t.chain_error {
        println!("warning:       a stored rotation was not taken: {e}");
    }
}

fn print_status(s: &Status) {
    println!("state:     {}", s.state);
    println!("running:   {} (slot {})", s.running_version, s.booted_slot);
    if let Some(v) = &s.new_version {
        println!("new:       {v}");
    }
    println!("channel:   {} from {}", s.channel, s.server);
    println!("reboot:    {}", s.reboot_strategy);
    if let Some(p) = &s.progress {
        println!(
            "progress:  {} / {} bytes at {}/s",
            p.done,
            p.total,
            human(p.rate)
        );
    }
    if let Some(t) = &s.last_check {
        println!("checked:   {}", t.to_rfc3339());
    }
    if let Some(a) = &s.last_apply {
        match &a.delta {
            Some(d) => println!(
                "applied:   {} by delta: {} fetched in {} request(s) ({:.1} % of the full payload); \
                 {} of {} blocks from the booted slot, {} from the passive slot",
                a.version,
                human(d.fetched_bytes + d.index_bytes),
                d.requests,
                d.percent_of_full,
                d.from_booted,
                d.blocks,
                d.from_passive
            ),
            None => println!(
                "applied:   {} from the full payload ({} downloaded){}",
                a.version,
                human(a.downloaded),
                a.delta_fallback
                    .as_ref()
                    .map(|w| format!("; no delta: {w}"))
                    .unwrap_or_default()
            ),
        }
    }
    if let Some(h) = &s.hook {
        println!("hook:      {h}");
    }
    if let Some(h) = &s.hook_failure {
        println!("hook failed: {h}");
    }
    if let Some(n) = &s.note {
        println!("note:      {n}");
    }
    if let Some(r) = &s.state_reset {
        println!(
            "state:     the state file was damaged ({}) and kept as {}; started over at {} \
             (downgrades stay refused; an older manifest could be replayed until it expires)",
            r.reason,
            r.kept_as,
            r.at.to_rfc3339()
        );
    }
    if let Some(s1) = &s.stage1 {
        if let Some(f) = &s1.failed {
            println!(
                "stage 1:   {} (ESP copy {}) was given up at {}: {}; running copy {}{}",
                f.install.version,
                f.install.copy,
                f.at.to_rfc3339(),
                f.reason,
                f.running_copy,
                if f.blocked {
                    " (not installed again)"
                } else {
                    ""
                }
            );
        }
        if let Some(u) = &s1.unblessed {
            println!(
                "stage 1:   copy {} booted this good slot but is not the loaders' default (since {}): {}; \
                 update-engine retries at every check (`nimbus-init bless-stage1` now)",
                u.copy,
                chrono::DateTime::from_timestamp(u.at, 0)
                    .map_or_else(|| u.at.to_string(), |t| t.to_rfc3339()),
                u.reason
            );
        }
        if let Some(p) = &s1.pending {
            println!(
                "stage 1:   {} in ESP copy {} (generation {}), {}",
                p.version,
                p.copy,
                p.generation,
                if p.booted {
                    "running; the default once this slot is marked good"
                } else {
                    "tried once at the next boot; the running copy stays the fallback"
                }
            );
        }
    }
    if let Some(r) = &s.rollback {
        println!(
            "rollback:  {} {} was given up at {}: {}; back on {}",
            r.failed_slot,
            r.failed_version.as_deref().unwrap_or("(unknown version)"),
            r.at.to_rfc3339(),
            r.reason,
            r.running_version
        );
    }
    if let Some(e) = &s.last_error {
        println!(
            "error:     {} ({}, {})",
            e.message,
            e.kind,
            e.at.to_rfc3339()
        );
    }
}

fn human(n: u64) -> String {
    let f = n as f64;
    if f >= (1 << 20) as f64 {
        format!("{:.1} MiB", f / (1 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn print_slots(s: &Status) {
    println!(
        "{:<6} {:>4} {:>8} {:>5} {:>10}  {:<12}",
        "SLOT", "PART", "PRIORITY", "TRIES", "SUCCESSFUL", "VERSION"
    );
    for e in &s.slots {
        println!(
            "{:<6} {:>4} {:>8} {:>5} {:>10}  {:<12}{}",
            e.label,
            e.partition,
            e.priority,
            e.tries,
            u8::from(e.successful),
            e.version.as_deref().unwrap_or("-"),
            if e.booted { "  (booted)" } else { "" }
        );
    }
}

fn run(cli: &Cli, client: &Client) -> Result<ExitCode, nimbus_updater::api::ClientError> {
    match &cli.cmd {
        Cmd::Metrics { metrics_socket } => {
            let path = metrics_socket
                .clone()
                .unwrap_or_else(|| cli.root.join(nimbus_updater::api::METRICS_SOCKET_PATH));
            print!("{}", nimbus_updater::api::read_metrics(&path)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status | Cmd::Slots | Cmd::Trust => {
            let r = client.call(&Request::Status)?;
            if r.error.is_some() {
                return Ok(answer(cli, &r));
            }
            let st = r.status.clone().unwrap_or_default();
            if cli.json {
                if matches!(cli.cmd, Cmd::Slots) {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&st.slots).unwrap_or_default()
                    );
                } else if matches!(cli.cmd, Cmd::Trust) {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&st.trust).unwrap_or_default()
                    );
                } else {
                    println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
                }
            } else if matches!(cli.cmd, Cmd::Slots) {
                print_slots(&st);
            } else if matches!(cli.cmd, Cmd::Trust) {
                print_trust(&st);
            } else {
                print_status(&st);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check => Ok(answer(cli, &client.call(&Request::Check)?)),
        Cmd::Rollback => Ok(answer(cli, &client.call(&Request::Rollback)?)),
        Cmd::MarkGood => Ok(answer(cli, &client.call(&Request::MarkGood)?)),
        Cmd::Cancel => Ok(answer(cli, &client.call(&Request::Cancel)?)),
        Cmd::Channel { name: None, .. } => {
            let st = client.call(&Request::Status)?.status.unwrap_or_default();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"channel": st.channel, "server": st.server})
                );
            } else {
                println!("{}", st.channel);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Channel {
            name: Some(n),
            allow_downgrade,
        } => Ok(answer(
            cli,
            &client.call(&Request::SetChannel {
                name: n.clone(),
                allow_downgrade: *allow_downgrade,
            })?,
        )),
        Cmd::Update { wait: false } => {
            Ok(answer(cli, &client.call(&Request::Apply { wait: false })?))
        }
        Cmd::Update { wait: true } => update_wait(cli, client),
        Cmd::Lock {
            cmd,
            endpoint,
            group,
        } => Ok(lock(cli, cmd, endpoint.as_deref(), group.as_deref())),
        Cmd::EtcdStepDown { endpoint } => Ok(etcd_step_down(cli, endpoint)),
    }
}

/// update.conf's etcd options (TLS, credentials, group), or the exit code
/// after saying why not.
fn etcd_options(cli: &Cli) -> Result<nimbus_etcd::lock::EtcdOptions, ExitCode> {
    let conf = nimbus::updateconf::UpdateConf::load_layered(&cli.root).map_err(|e| {
        eprintln!(
            "updatectl: {}: {e}",
            cli.root.join(nimbus::updateconf::ETC_PATH).display()
        );
        ExitCode::from(2)
    })?;
    nimbus_etcd::options_from_conf(&conf).map_err(|e| {
        eprintln!("updatectl: update.conf: {e}");
        ExitCode::from(2)
    })
}

fn lock_exit(e: &nimbus_etcd::lock::LockError) -> ExitCode {
    eprintln!("updatectl: {e}");
    ExitCode::from(match e {
        nimbus_etcd::lock::LockError::Malformed { .. } => 4,
        nimbus_etcd::lock::LockError::Tls { .. } => 2,
        _ => 3,
    })
}

fn etcd_step_down(cli: &Cli, endpoint: &str) -> ExitCode {
    let mut opts = match etcd_options(cli) {
        Ok(o) => o,
        Err(code) => return code,
    };
    match reqwest::Url::parse(endpoint) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        Ok(_) => {
            eprintln!("updatectl: --endpoint {endpoint}: only http and https are supported");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("updatectl: --endpoint {endpoint}: {e}");
            return ExitCode::from(2);
        }
    }
    opts.endpoints = vec![endpoint.trim_end_matches('/').to_string()];
    match nimbus_etcd::lock::LockClient::new(opts).and_then(|c| nimbus_etcd::leader::step_down(&c))
    {
        Ok(r) => {
            if cli.json {
                let (outcome, from, to) = match &r {
                    nimbus_etcd::leader::StepDown::NotLeader { me, leader } => {
                        ("not-leader", me, leader)
                    }
                    nimbus_etcd::leader::StepDown::Alone { me } => ("alone", me, me),
                    nimbus_etcd::leader::StepDown::Moved { from, to } => ("moved", from, to),
                };
                println!(
                    "{}",
                    serde_json::json!({"outcome": outcome, "member": from, "leader": to, "message": r.to_string()})
                );
            } else {
                println!("{r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => lock_exit(&e),
    }
}

fn lock(cli: &Cli, cmd: &LockCmd, endpoint: Option<&str>, group: Option<&str>) -> ExitCode {
    let mut opts = match etcd_options(cli) {
        Ok(o) => o,
        Err(code) => return code,
    };
    if let Some(e) = endpoint {
        opts.endpoints = vec![e.trim_end_matches('/').to_string()];
    }
    if let Some(g) = group {
        opts.group = Some(g.to_string());
    }
    let result = nimbus_etcd::lock::LockClient::new(opts).and_then(|c| {
        let key = c.key().to_string();
        let (msg, sem) = match cmd {
            LockCmd::Status => (String::new(), c.get()?.0),
            LockCmd::Unlock { machine_id } => {
                let held = c.release(machine_id)?;
                let m = if held {
                    format!("{machine_id} released")
                } else {
                    format!("{machine_id} held no slot")
                };
                (m, c.get()?.0)
            }
            LockCmd::SetMax { n } => (format!("max set to {n}"), c.set_max(*n)?),
        };
        Ok((key, msg, sem))
    });
    match result {
        Ok((key, msg, sem)) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"key": key, "semaphore": sem.semaphore, "max": sem.max, "holders": sem.holders, "message": msg})
                );
            } else {
                if !msg.is_empty() {
                    println!("{msg}");
                }
                println!("key:     {key}");
                println!("free:    {} of {}", sem.semaphore, sem.max);
                println!(
                    "holders: {}",
                    if sem.holders.is_empty() {
                        "-".to_string()
                    } else {
                        sem.holders.join(", ")
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => lock_exit(&e),
    }
}

/// Run the update on one connection and show progress from a second.
fn update_wait(cli: &Cli, client: &Client) -> Result<ExitCode, nimbus_updater::api::ClientError> {
    let path = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.root.join(SOCKET_PATH));
    let worker = std::thread::spawn(move || Client::new(path).call(&Request::Apply { wait: true }));
    let tty = std::io::stderr().is_terminal() && !cli.json;
    let bar = if tty {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut last_line = std::time::Instant::now() - std::time::Duration::from_secs(10);
    let watched = client.watch(|st| {
        if let Some(p) = &st.progress {
            match &bar {
                Some(b) => {
                    b.set_length(p.total);
                    b.set_position(p.done);
                    b.set_message(st.state.to_string());
                }
                None if !cli.json && last_line.elapsed().as_secs() >= 5 => {
                    eprintln!(
                        "{}: {} / {} bytes, {}/s",
                        st.state,
                        p.done,
                        p.total,
                        human(p.rate)
                    );
                    last_line = std::time::Instant::now();
                }
                None => {}
            }
        }
        !worker.is_finished()
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let _ = watched;
    let r = worker
        .join()
        .map_err(|_| nimbus_updater::api::ClientError::Protocol {
            path: PathBuf::new(),
            reason: "worker panicked".into(),
        })??;
    if !cli.json {
        if let Some(st) = &r.status {
            print_status(st);
        }
    }
    Ok(answer(cli, &r))
}
