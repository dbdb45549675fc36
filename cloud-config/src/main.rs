//! `cloud-config validate|apply|boot`.
//!
//! Exit codes: 0 success (warnings allowed), 1 the document has errors or
//! applying it failed, 2 bad command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nimbus_cloud_config::addresses::{self, Places};
use nimbus_cloud_config::apply::{self, CommandRunner, NoCommands, Root, SystemCommands};
use nimbus_cloud_config::schema::{self, Severity, UserData};
use nimbus_cloud_config::sources::Sources;
use nimbus_cloud_config::subst::{self, Addresses};

#[derive(Parser)]
#[command(
    name = "cloud-config",
    about = "Validate and apply CoreOS-style #cloud-config user-data"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a file; print every problem as `line N: error|warning: message`.
    /// `$public_ipv4` and friends are checked as documentation addresses
    /// (192.0.2.1, 2001:db8::1) would be.
    Validate {
        file: PathBuf,
        /// Print problems as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate, then apply a file to the system (or to --root DIR).
    /// `$public_ipv4`, `$private_ipv4` (and the _ipv6 pair) are replaced
    /// first by this host's addresses: COREOS_PUBLIC_IPV4=... in
    /// /etc/environment or /oem/environment, else the default route's
    /// interface; one that is used but not known fails, naming it.
    Apply {
        file: PathBuf,
        /// Apply into this directory instead of the running system; no
        /// commands (daemon-reload, unit commands, scripts) are run. The
        /// environment files are read inside it.
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long, hide = true)]
        route_table: Option<PathBuf>,
    },
    /// Find user-data in the boot sources (OEM partition, fw_cfg,
    /// config-drive, cloud-config-url=) and apply each one found.
    Boot {
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long, hide = true)]
        oem_dir: Option<PathBuf>,
        #[arg(long, hide = true)]
        fw_cfg: Option<PathBuf>,
        #[arg(long, hide = true)]
        config_drive: Option<PathBuf>,
        #[arg(long, hide = true)]
        cmdline: Option<PathBuf>,
        #[arg(long, hide = true)]
        route_table: Option<PathBuf>,
    },
}

/// Where this host's addresses are looked for (the environment files as
/// paths inside the apply root, read through it).
fn places(route_table: Option<PathBuf>) -> Places {
    let d = Places::default();
    Places {
        proc_route: route_table.unwrap_or(d.proc_route),
        ..d
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    tracing::debug!(
        "cloud-config {} {}",
        env!("CARGO_PKG_VERSION"),
        nimbus::BUILD_TAG
    );
    match cli.cmd {
        Cmd::Validate { file, json } => validate(&file, json),
        Cmd::Apply {
            file,
            root,
            json,
            route_table,
        } => match nimbus_cloud_config::read_limited(&file) {
            Ok(text) => {
                let p = places(route_table);
                apply_text(
                    &text,
                    &file.display().to_string(),
                    root.as_deref(),
                    &p,
                    json,
                )
            }
            Err(e) => fail(&e),
        },
        Cmd::Boot {
            root,
            oem_dir,
            fw_cfg,
            config_drive,
            cmdline,
            route_table,
        } => {
            let p = places(route_table);
            let d = Sources::default();
            let sources = Sources {
                oem_dir: oem_dir.unwrap_or(d.oem_dir),
                fw_cfg: fw_cfg.unwrap_or(d.fw_cfg),
                config_drive: config_drive.unwrap_or(d.config_drive),
                cmdline: cmdline.unwrap_or(d.cmdline),
            };
            let (found, errors) = sources.collect();
            let mut code = ExitCode::SUCCESS;
            for e in &errors {
                tracing::error!("{e}");
                code = ExitCode::FAILURE;
            }
            if found.is_empty() {
                tracing::info!("no user-data found");
            }
            for f in found {
                tracing::info!(source = %f.source, "applying user-data");
                if apply_text(&f.text, &f.source, root.as_deref(), &p, false) != ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
            code
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

fn validate(file: &Path, json: bool) -> ExitCode {
    let text = match nimbus_cloud_config::read_limited(file) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    // Placeholders for every variable: what is checked is the shape.
    let text = subst::substitute(&text, &Addresses::placeholders(), "").unwrap_or(text);
    let (_, problems) = schema::check(&text);
    print_problems(&file.display().to_string(), &problems, json);
    if problems.iter().any(|p| p.severity == Severity::Error) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_problems(source: &str, problems: &[schema::Problem], json: bool) {
    if json {
        let v: Vec<_> = problems
            .iter()
            .map(|p| {
                serde_json::json!({
                    "line": p.line,
                    "severity": if p.severity == Severity::Error { "error" } else { "warning" },
                    "message": p.message,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "source": source, "problems": v }));
    } else {
        for p in problems {
            println!("{p}");
        }
    }
}

fn apply_text(
    text: &str,
    source: &str,
    root: Option<&Path>,
    places: &Places,
    json: bool,
) -> ExitCode {
    let mut r = match Root::new(root.unwrap_or(Path::new("/"))) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    // Replaced before parsing, as coreos-cloudinit did; a script (`#!`)
    // is left as written (it can read /etc/environment itself).
    let substituted;
    let text = if text.starts_with("#cloud-config") && subst::uses_any(text) {
        let a = addresses::discover(places, &|f| r.read(&f.to_string_lossy()));
        match subst::substitute(text, &a, &places.describe()) {
            Ok(t) => {
                substituted = t;
                &substituted
            }
            Err(e) => return fail(&format!("{source}: not applied: {e}")),
        }
    } else {
        text
    };
    let (data, problems) = schema::check(text);
    if !problems.is_empty() {
        // Problems go to stderr here: stdout is the apply report.
        for p in &problems {
            eprintln!("{source}: {p}");
        }
    }
    let Some(data) = data else {
        return fail(&format!("{source}: not applied: the document has errors"));
    };
    let mut runner: Box<dyn CommandRunner> = match root {
        Some(_) => Box::new(NoCommands),
        None => Box::new(SystemCommands),
    };
    let result = match &data {
        UserData::Empty => Ok(()),
        UserData::CloudConfig(cfg) => apply::apply(&mut r, cfg, runner.as_mut()),
        UserData::Script(s) => apply::apply_script(&mut r, s, runner.as_mut()),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r.report).unwrap_or_default()
        );
    } else {
        for c in &r.report.changed {
            println!("changed {c}");
        }
        for c in &r.report.commands {
            println!("ran {c}");
        }
        println!(
            "{} changed, {} unchanged",
            r.report.changed.len(),
            r.report.unchanged
        );
    }
    for e in &r.report.errors {
        eprintln!("error: {source}: {e}");
    }
    match result {
        Err(e) => fail(&format!("{source}: {e}")),
        Ok(()) if !r.report.errors.is_empty() => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
    }
}
