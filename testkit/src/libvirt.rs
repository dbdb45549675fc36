//! Real vagrant-libvirt for the VM tier: Debian's libvirtd and virtlogd
//! started as daemons inside a network namespace made for one test (so the
//! management network, its DHCP and every private network exist only
//! there), and `vagrant` run in it with a `VAGRANT_HOME` of the test's own.
//! Every call has a deadline; the namespace and its daemons go on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long one command may take: a `vagrant up`, `reload` or `provision`
/// boots or waits for guests under TCG; everything else (virsh, ip, one
/// `vagrant ssh`) answers in seconds.
fn limit_for(cmd: &Command) -> Duration {
    let vagrant = cmd.get_program() == "vagrant" || cmd.get_args().any(|a| a == "vagrant");
    let boots = cmd
        .get_args()
        .any(|a| a == "up" || a == "reload" || a == "provision" || a == "destroy");
    match (vagrant, boots) {
        // Three TCG guests booting at once on two cores.
        (true, true) => Duration::from_secs(1800),
        (true, false) => Duration::from_secs(300),
        _ => Duration::from_secs(120),
    }
}

/// Run `cmd` under its deadline; panics (naming the command) when it
/// cannot be run or outlives it.
pub fn run(cmd: &mut Command) -> Output {
    let limit = limit_for(cmd);
    crate::proc::output(cmd, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// Run `cmd`; its standard output, or a panic with both outputs.
pub fn ok(cmd: &mut Command) -> String {
    let dbg = crate::proc::describe(cmd);
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{dbg}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// libvirtd + virtlogd in their own network namespace; torn down on drop.
pub struct Libvirt {
    pub ns: String,
}

impl Libvirt {
    /// `tag` names the namespace (with this process's id).
    pub fn start(tag: &str) -> Libvirt {
        let ns = format!("nimbus-{tag}-{}", std::process::id());
        ok(Command::new("ip").args(["netns", "add", &ns]));
        let l = Libvirt { ns };
        ok(Command::new("ip").args(["-n", &l.ns, "link", "set", "lo", "up"]));
        ok(l.exec("virtlogd").arg("-d"));
        ok(l.exec("libvirtd").arg("-d"));
        // libvirtd answers once its socket is up.
        let t = Instant::now();
        while !run(l.exec("virsh").args(["-c", "qemu:///system", "version"]))
            .status
            .success()
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "libvirtd did not come up"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        l
    }

    /// `prog` as a command inside the namespace.
    pub fn exec(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, prog]);
        c
    }

    /// A Vagrant project in `dir` with `home` as VAGRANT_HOME, run against
    /// this libvirt; its machines are destroyed when it is dropped,
    /// whatever happened before.
    pub fn project(&self, dir: &Path, home: &Path) -> Project<'_> {
        Project {
            lv: self,
            dir: dir.to_path_buf(),
            home: home.to_path_buf(),
        }
    }

    /// What libvirt holds: domains, volumes of the default pool (but the
    /// boxes' base images), networks. After a `vagrant destroy` that left
    /// nothing behind, what it was before the `vagrant up`.
    pub fn holdings(&self) -> Vec<String> {
        let virsh = |args: &[&str]| -> Vec<String> {
            let o = run(self.exec("virsh").args(["-c", "qemu:///system"]).args(args));
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        };
        let mut out: Vec<String> = virsh(&["list", "--all", "--name"])
            .into_iter()
            .map(|d| format!("domain {d}"))
            .collect();
        out.extend(
            virsh(&["vol-list", "default"])
                .into_iter()
                .skip(2)
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                // The box's base image stays until `vagrant box remove`.
                .filter(|v| !v.contains("_vagrant_box_image_"))
                .map(|v| format!("volume {v}")),
        );
        out.extend(
            virsh(&["net-list", "--all", "--name"])
                .into_iter()
                .map(|n| format!("network {n}")),
        );
        out.sort();
        out
    }
}

/// See [`Libvirt::project`].
pub struct Project<'a> {
    lv: &'a Libvirt,
    dir: PathBuf,
    home: PathBuf,
}

impl Project<'_> {
    /// `vagrant ARGS` in the project, libvirt as the provider.
    pub fn vagrant(&self, args: &[&str]) -> Command {
        let mut c = self.lv.exec("vagrant");
        c.args(args)
            .current_dir(&self.dir)
            .env("VAGRANT_HOME", &self.home)
            .env("VAGRANT_DEFAULT_PROVIDER", "libvirt")
            .env("VAGRANT_CHECKPOINT_DISABLE", "1");
        c
    }
}

impl Drop for Project<'_> {
    fn drop(&mut self) {
        let mut c = self.vagrant(&["destroy", "-f"]);
        let _ = crate::proc::output(&mut c, Duration::from_secs(600));
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let o = run(Command::new("ip").args(["netns", "pids", &self.ns]));
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = run(Command::new("kill").arg(pid));
        }
        std::thread::sleep(Duration::from_secs(1));
        let o = run(Command::new("ip").args(["netns", "pids", &self.ns]));
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = run(Command::new("kill").args(["-9", pid]));
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.ns]));
    }
}

/// A Vagrant test's scratch space: a temporary directory under `under`
/// (the test's `CARGO_TARGET_TMPDIR`) holding the box of `version`, built
/// into `image/`, `vagrant.d` for VAGRANT_HOME and an empty `project/`.
pub struct Scratch {
    pub tmp: tempfile::TempDir,
    pub boxfile: PathBuf,
    pub home: PathBuf,
    pub project: PathBuf,
}

impl Scratch {
    /// `xtask` is the test's `CARGO_BIN_EXE_xtask`.
    pub fn new(xtask: &str, under: &str, prefix: &str, version: &str) -> Scratch {
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(under)
            .unwrap_or_else(|e| panic!("a temporary directory in {under}: {e}"));
        let boxfile = build_box(xtask, &tmp.path().join("image"), version);
        let home = tmp.path().join("vagrant.d");
        let project = tmp.path().join("project");
        std::fs::create_dir_all(&project).unwrap_or_else(|e| panic!("{}: {e}", project.display()));
        Scratch {
            tmp,
            boxfile,
            home,
            project,
        }
    }
}

/// `xtask build-image --formats box` of `version` into `dir`; the box's
/// path. `xtask` is the test's `CARGO_BIN_EXE_xtask`.
pub fn build_box(xtask: &str, dir: &Path, version: &str) -> PathBuf {
    let o = crate::proc::output(
        Command::new(xtask)
            .args([
                "build-image",
                "--version",
                version,
                "--formats",
                "box",
                "--out",
            ])
            .arg(dir)
            .env("SOURCE_DATE_EPOCH", crate::ROOTFS_EPOCH),
        Duration::from_secs(1200),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        o.status.success(),
        "build-image: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir.join("nimbus.box")
}
