//! Hosts for the reboot-coordination tests (etcd_lock.rs, fleetlock.rs,
//! hooks.rs): a [`Fixture`] in host mode with its own machine-id and
//! update.conf, update-engine as a daemon whose "reboot" is a command that
//! leaves a trace, and the waits those tests share, each with a deadline.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Fixture, UPDATECTL};

pub struct RebootHost {
    pub f: Fixture,
    pub name: String,
    pub sock: PathBuf,
    /// One line per reboot: when it happened (`date +%s.%N`).
    pub reboots: PathBuf,
}

impl RebootHost {
    /// `strategy`: update.conf's lines after the channel (REBOOT_STRATEGY
    /// and what it needs).
    pub fn new(name: &str, machine_id: &str, strategy: &str) -> RebootHost {
        let f = Fixture::new(3, 32);
        std::fs::write(f.root.join("etc/machine-id"), format!("{machine_id}\n"))
            .expect("machine-id");
        std::fs::write(
            f.root.join(nimbus::paths::UPDATE_CONF_ETC),
            format!(
                "GROUP=stable\nSERVER={}\nIO_WRITE_BPS=unlimited\n{strategy}",
                f.httpd.url()
            ),
        )
        .expect("conf");
        let sock = f.tmp.path().join("ue.sock");
        let reboots = f.tmp.path().join("reboots");
        RebootHost {
            f,
            name: name.into(),
            sock,
            reboots,
        }
    }

    /// The daemon, its reboots recorded in `reboots`.
    pub fn daemon(&self, first_check: &str) -> Child {
        let hook = format!("date +%s.%N >> {}", self.reboots.display());
        self.daemon_rebooting_with(first_check, &hook)
    }

    /// The daemon with the reboot policy stepped every second and `reboot`
    /// run instead of a reboot.
    pub fn daemon_rebooting_with(&self, first_check: &str, reboot: &str) -> Child {
        let _ = std::fs::remove_file(&self.sock);
        self.f
            .engine(&[
                "--socket",
                self.sock.to_str().expect("utf8"),
                "--first-check",
                first_check,
                "--reboot-poll",
                "1",
                "--reboot-command",
                reboot,
                "--connect-timeout",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("daemon")
    }

    pub fn reboot_times(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.reboots)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(UPDATECTL)
            .arg("--socket")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("updatectl")
    }

    pub fn wait_socket(&self) {
        wait_for(
            &format!("{}: socket", self.name),
            Duration::from_secs(30),
            || self.sock.exists(),
        );
    }

    pub fn lock_taken(&self) -> bool {
        !self.f.state()["lock_taken"].is_null()
    }
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for a daemon to end (it "rebooted"); killed and failed past `limit`.
pub fn wait_exit(c: &mut Child, limit: Duration, what: &str) {
    let t0 = Instant::now();
    while c.try_wait().expect("wait").is_none() {
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
