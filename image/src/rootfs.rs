//! The Debian root filesystem, from mmdebstrap, with two caches under
//! `target/nimbus/cache/`:
//!
//! - `debs/`: downloaded packages plus `SHA256SUMS`; entries that do not
//!   match (a torn download, a flipped bit) are deleted before use so apt
//!   fetches them again.
//! - `rootfs-<key>/`: the finished, unmodified mmdebstrap output, keyed by
//!   everything that went into it. Installing packages dominates the build
//!   (86 s cold or warm here: dpkg, not the network), so a second build with
//!   the same inputs reuses it. A `.complete` marker is written last.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{run_tool, sha256_file, ImageError};

/// Bump when the recipe below changes in a way the key does not capture.
const RECIPE: u32 = 1;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RootfsSpec {
    pub suite: String,
    pub mirrors: Vec<String>,
    pub packages: Vec<String>,
    pub epoch: u64,
}

impl RootfsSpec {
    pub fn default_for(epoch: u64) -> RootfsSpec {
        RootfsSpec {
            suite: "bookworm".into(),
            mirrors: vec![
                "deb http://deb.debian.org/debian bookworm main".into(),
                "deb http://deb.debian.org/debian bookworm-updates main".into(),
                "deb http://deb.debian.org/debian-security bookworm-security main".into(),
            ],
            packages: [
                "systemd-sysv",
                "udev",
                "dbus",
                "kmod",
                "iproute2",
                "ca-certificates",
                "openssh-server",
                "etcd-server",
                // etcdctl, as CoreOS shipped it: root's login shell points it
                // at the host's client certificate (cluster-config's
                // /etc/profile.d/nimbus-etcdctl.sh).
                "etcd-client",
                "containerd",
                // dockerd on the containerd above; swarm mode is built in.
                "docker.io",
                // The Debian kernel enables AppArmor, and dockerd then
                // refuses to start containers without apparmor_parser to
                // load its docker-default profile (as Debian recommends).
                "apparmor",
                "linux-image-amd64",
                "systemd-boot-efi",
                // `core` has passwordless sudo, as on CoreOS (Vagrant needs it).
                "sudo",
                // The host's own name resolves without an /etc/hosts line
                // (its postinst adds `myhostname` to nsswitch.conf), as on
                // CoreOS: a name set by Vagrant or cloud-config does not
                // make every sudo say "unable to resolve host".
                "libnss-myhostname",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            epoch,
        }
    }

    pub fn key(&self) -> String {
        let json = serde_json::to_vec(&(RECIPE, self)).unwrap_or_default();
        hex::encode(&Sha256::digest(json)[..8])
    }
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// Drop cache entries that do not match their recorded hash, and unknown
/// files. Returns how many were dropped.
pub fn verify_deb_cache(dir: &Path) -> Result<usize, ImageError> {
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let sums_path = dir.join("SHA256SUMS");
    let sums: BTreeMap<String, String> = fs::read_to_string(&sums_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (h, n) = l.split_once("  ")?;
            Some((n.to_string(), h.to_string()))
        })
        .collect();
    let mut dropped = 0;
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let p = e.map_err(io_at(dir))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == "SHA256SUMS" {
            continue;
        }
        if p.is_dir() {
            // apt's partial/ downloads: never trusted across runs.
            fs::remove_dir_all(&p).map_err(io_at(&p))?;
            continue;
        }
        let ok = name.ends_with(".deb")
            && sums
                .get(&name)
                .is_some_and(|h| sha256_file(&p).ok().as_ref() == Some(h));
        if !ok {
            fs::remove_file(&p).map_err(io_at(&p))?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

fn record_deb_cache(dir: &Path) -> Result<(), ImageError> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    names.sort();
    let mut out = String::new();
    for p in names {
        let h = sha256_file(&p)?;
        out.push_str(&format!(
            "{h}  {}\n",
            p.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    nimbus::durable::write_atomic(&dir.join("SHA256SUMS"), out.as_bytes(), 0o644)
        .map_err(|e| ImageError::Invalid(e.to_string()))
}

pub struct Rootfs {
    pub dir: PathBuf,
    pub cache_hit: bool,
    pub debs_dropped: usize,
}

/// The pristine rootfs for `spec`, built or reused. Never modify it: copy it.
pub fn obtain(spec: &RootfsSpec, cache: &Path, log: &Path) -> Result<Rootfs, ImageError> {
    // Two builds at once (parallel tests, two terminals) must not both run
    // mmdebstrap into the same directory: the second waits, then reuses.
    fs::create_dir_all(cache).map_err(io_at(cache))?;
    let lock_path = cache.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io_at(&lock_path))?;
    lock.lock().map_err(io_at(&lock_path))?;
    let dir = cache.join(format!("rootfs-{}", spec.key()));
    if dir.join(".complete").exists() {
        return Ok(Rootfs {
            dir,
            cache_hit: true,
            debs_dropped: 0,
        });
    }
    let debs = cache.join("debs");
    let debs_dropped = verify_deb_cache(&debs)?;
    let tmp = cache.join(format!("rootfs-{}.tmp", spec.key()));
    let _ = fs::remove_dir_all(&tmp);
    let logf = fs::File::create(log).map_err(io_at(log))?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", spec.packages.join(",")))
        .args(["--skip=essential/unlink", "--skip=cleanup/apt/cache"])
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            debs.display()
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            debs.display()
        ))
        .arg(&spec.suite)
        .arg(&tmp)
        .args(&spec.mirrors)
        .env("SOURCE_DATE_EPOCH", spec.epoch.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().map_err(io_at(log))?)
        .stderr(logf);
    let status = cmd.status().map_err(|e| ImageError::Tool {
        tool: "mmdebstrap".into(),
        reason: format!("cannot run it ({e}); `cargo xtask deps` installs it"),
    })?;
    if !status.success() {
        let tail: String = fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ImageError::Tool {
            tool: "mmdebstrap".into(),
            reason: format!("failed ({status}); log {}:\n{tail}", log.display()),
        });
    }
    record_deb_cache(&debs)?;
    fs::write(tmp.join(".complete"), spec.key()).map_err(io_at(&tmp))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).map_err(io_at(&dir))?;
    Ok(Rootfs {
        dir,
        cache_hit: false,
        debs_dropped,
    })
}

/// Kernel module trees a container host on servers and VMs loads, relative
/// to `kernel/`: storage, network, filesystems, netfilter and overlay
/// networking (Docker, swarm), virtualisation guests and hosts, server
/// platform drivers. Everything else (sound, GPUs, cameras, Wi-Fi,
/// Bluetooth, industrial I/O, embedded buses) goes: a third of /usr.
/// Modules a kept one depends on are kept too.
pub const KEPT_MODULES: &[&str] = &[
    "arch/",
    "block/",
    "crypto/",
    "lib/",
    "mm/",
    "virt/",
    "fs/",
    "net/",
    "drivers/acpi/",
    "drivers/ata/",
    "drivers/base/",
    "drivers/block/",
    "drivers/char/",
    "drivers/cpufreq/",
    "drivers/crypto/",
    "drivers/dax/",
    "drivers/dca/",
    "drivers/dma/",
    "drivers/edac/",
    "drivers/firmware/",
    "drivers/hid/",
    "drivers/hv/",
    "drivers/hwmon/",
    "drivers/i2c/",
    "drivers/input/",
    "drivers/md/",
    "drivers/message/",
    "drivers/net/",
    "drivers/nvdimm/",
    "drivers/nvme/",
    "drivers/pci/",
    "drivers/powercap/",
    "drivers/pps/",
    "drivers/ptp/",
    "drivers/scsi/",
    "drivers/thermal/",
    "drivers/tty/",
    "drivers/usb/core/",
    "drivers/usb/host/",
    "drivers/usb/storage/",
    "drivers/usb/common/",
    "drivers/vfio/",
    "drivers/vhost/",
    "drivers/virt/",
    "drivers/virtio/",
    "drivers/watchdog/",
    "drivers/xen/",
];

/// Inside the kept trees: hardware and protocols no server or VM has.
pub const DROPPED_MODULES: &[&str] = &[
    "net/bluetooth/",
    "net/mac80211/",
    "net/wireless/",
    "net/nfc/",
    "net/batman-adv/",
    "net/6lowpan/",
    "net/ieee802154/",
    "net/mac802154/",
    "net/can/",
    "net/atm/",
    "drivers/net/wireless/",
    "drivers/net/usb/",
    "drivers/net/can/",
    "drivers/net/wwan/",
    "drivers/net/wan/",
    "drivers/net/ieee802154/",
    "drivers/net/hamradio/",
    "drivers/net/arcnet/",
    "drivers/net/fddi/",
    "drivers/net/slip/",
    "drivers/net/plip/",
    "drivers/net/ethernet/3com/",
    "drivers/net/ethernet/8390/",
    "drivers/net/ethernet/adaptec/",
    "drivers/net/ethernet/agere/",
    "drivers/net/ethernet/alteon/",
    "drivers/net/ethernet/atheros/",
    "drivers/net/ethernet/dec/",
    "drivers/net/ethernet/dlink/",
    "drivers/net/ethernet/fealnx.ko",
    "drivers/net/ethernet/fujitsu/",
    "drivers/net/ethernet/jme.ko",
    "drivers/net/ethernet/micrel/",
    "drivers/net/ethernet/natsemi/",
    "drivers/net/ethernet/packetengines/",
    "drivers/net/ethernet/rdc/",
    "drivers/net/ethernet/silan/",
    "drivers/net/ethernet/sis/",
    "drivers/net/ethernet/smsc/",
    "drivers/net/ethernet/sun/",
    "drivers/net/ethernet/tehuti/",
    "drivers/net/ethernet/ti/",
    "drivers/net/ethernet/via/",
    "drivers/net/ethernet/xircom/",
    "fs/adfs/",
    "fs/affs/",
    "fs/befs/",
    "fs/bfs/",
    "fs/coda/",
    "fs/efs/",
    "fs/freevxfs/",
    "fs/hfs/",
    "fs/hfsplus/",
    "fs/hpfs/",
    "fs/jffs2/",
    "fs/jfs/",
    "fs/minix/",
    "fs/nilfs2/",
    "fs/ocfs2/",
    "fs/omfs/",
    "fs/orangefs/",
    "fs/qnx4/",
    "fs/qnx6/",
    "fs/reiserfs/",
    "fs/romfs/",
    "fs/sysv/",
    "fs/ubifs/",
    "fs/ufs/",
    "fs/vboxsf/",
    "fs/gfs2/",
    "fs/dlm/",
    "fs/zonefs/",
];

/// What pruning and compression did to the module tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleReport {
    pub kept: usize,
    pub removed: usize,
    pub compressed: usize,
    /// What `strip` left out of USR (it runs just before).
    pub dropped: Dropped,
}

/// `modules.dep` as module -> dependencies (paths relative to the kernel's
/// module directory).
pub fn read_modules_dep(moddir: &Path) -> Result<BTreeMap<String, Vec<String>>, ImageError> {
    let p = moddir.join("modules.dep");
    let dep = fs::read_to_string(&p).map_err(io_at(&p))?;
    Ok(dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect())
}

/// The modules `roots` need, themselves included.
fn closure(
    deps: &BTreeMap<String, Vec<String>>,
    roots: impl IntoIterator<Item = String>,
) -> std::collections::BTreeSet<String> {
    let mut keep = std::collections::BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(m) = todo.pop() {
        if keep.insert(m.clone()) {
            todo.extend(deps.get(&m).into_iter().flatten().cloned());
        }
    }
    keep
}

/// A module path's file name as modprobe compares it (`-` and `_` alike).
pub fn module_file(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map(|f| f.to_string_lossy().replace('-', "_"))
        .unwrap_or_default()
}

/// Which modules stay: those under [`KEPT_MODULES`] and not under
/// [`DROPPED_MODULES`], plus everything they depend on. Pure, for tests.
pub fn modules_to_keep(deps: &BTreeMap<String, Vec<String>>) -> std::collections::BTreeSet<String> {
    let wanted = deps.keys().filter(|m| {
        let rel = m.strip_prefix("kernel/").unwrap_or(m);
        KEPT_MODULES.iter().any(|k| rel.starts_with(k))
            && !DROPPED_MODULES.iter().any(|d| rel.starts_with(d))
    });
    closure(deps, wanted.cloned())
}

/// Remove the modules [`modules_to_keep`] does not keep, then compress the
/// rest with zstd except `plain` (stage 1 loads those itself with
/// finit_module, and their dependencies): kmod in stage 2 reads `.ko.zst`.
/// Ends with `depmod`, so modules.dep names the files as they now are.
pub fn prune_modules(root: &Path, kver: &str, plain: &[&str]) -> Result<ModuleReport, ImageError> {
    let moddir = root.join("usr/lib/modules").join(kver);
    let deps = read_modules_dep(&moddir)?;
    let keep = modules_to_keep(&deps);
    let mut report = ModuleReport::default();
    for m in deps.keys() {
        if !keep.contains(m) {
            let p = moddir.join(m);
            fs::remove_file(&p).map_err(io_at(&p))?;
            report.removed += 1;
        }
    }
    report.kept = keep.len();
    let plain_roots = keep
        .iter()
        .filter(|m| plain.iter().any(|p| module_file(m) == format!("{p}.ko")))
        .cloned();
    let plain = closure(&deps, plain_roots);
    let todo: Vec<&String> = keep
        .iter()
        .filter(|m| m.ends_with(".ko") && !plain.contains(*m))
        .collect();
    // Two workers: the build machine has two cores, and each module is small.
    let chunks: Vec<Vec<&String>> = {
        let half = todo.len().div_ceil(2).max(1);
        todo.chunks(half).map(|c| c.to_vec()).collect()
    };
    let results: Vec<Result<usize, ImageError>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let moddir = &moddir;
                s.spawn(move || -> Result<usize, ImageError> {
                    for m in chunk {
                        let src = moddir.join(m);
                        let data = fs::read(&src).map_err(io_at(&src))?;
                        let z = zstd::bulk::compress(&data, 12).map_err(io_at(&src))?;
                        let dst = moddir.join(format!("{m}.zst"));
                        fs::write(&dst, z).map_err(io_at(&dst))?;
                        fs::remove_file(&src).map_err(io_at(&src))?;
                    }
                    Ok(chunk.len())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ImageError::Invalid(
                        "module compression worker panicked".into(),
                    ))
                })
            })
            .collect()
    });
    for r in results {
        report.compressed += r?;
    }
    // Directories left empty by the pruning.
    let mut dirs = vec![moddir.join("kernel")];
    let mut all = Vec::new();
    while let Some(d) = dirs.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        all.push(d);
    }
    for d in all.iter().rev() {
        let _ = fs::remove_dir(d);
    }
    run_tool(
        Command::new("chroot")
            .arg(root)
            .args(["depmod", "-a", kver]),
        "depmod",
    )?;
    Ok(report)
}

pub fn kernel_version(root: &Path) -> Result<String, ImageError> {
    let dir = root.join("usr/lib/modules");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .map_err(io_at(&dir))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    v.sort();
    match v.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(ImageError::Invalid(format!(
            "expected one kernel in {}, found {v:?}",
            dir.display()
        ))),
    }
}

/// Packages whose files leave USR whole (docs/image.md, "What USR leaves
/// out"). `usrmerge` converts a split /usr while packages install and pulls
/// in the full perl for it; nothing on a running host uses either (the
/// perl scripts that stay, debconf's and c_rehash, need only perl-base,
/// which stays).
pub const DROPPED_PACKAGES: &[&str] = &[
    // apt itself: its binaries go in `strip` with dpkg's; these are what
    // they left (the library, the signature checker, the archive keys),
    // which nothing else uses.
    "apt",
    "libapt-pkg6.0",
    "gpgv",
    "debian-archive-keyring",
    "usrmerge",
    "libfile-find-rule-perl",
    "libnumber-compare-perl",
    "libtext-glob-perl",
    "perl",
    "perl-modules-5.36",
    "libperl5.36",
];

/// Paths that leave USR from packages that stay (docs/image.md, "What USR
/// leaves out").
pub const DROPPED_PATHS: &[&str] = &[
    // Translations: a Nimbus host runs in C.UTF-8.
    "usr/share/locale",
    // libnetwork's test tools that Debian's docker.io ships; nothing runs them.
    "usr/bin/dnet",
    "usr/sbin/ovrouter",
    // containerd's v1 shims: dockerd starts containers through
    // io.containerd.runc.v2 (containerd-shim-runc-v2, which stays).
    "usr/bin/containerd-shim",
    "usr/bin/containerd-shim-runc-v1",
    // containerd's debug client (7.4 MiB of the payload; "not supported
    // for production use" by its own docs): `docker` is the host's client,
    // and an operator who wants ctr runs it from a container.
    "usr/bin/ctr",
];

/// What [`strip`] took out of USR beyond the package manager and the docs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Of [`DROPPED_PACKAGES`], those that were installed.
    pub packages: Vec<String>,
    pub files: usize,
    pub bytes: u64,
}

/// A path from a dpkg file list as it lies in a merged-/usr tree: Debian
/// bookworm's packages still name `/bin`, `/sbin`, `/lib*`, which are
/// links into `/usr`.
fn merged_usr(p: &str) -> String {
    let p = p.trim_start_matches('/');
    for top in ["bin/", "sbin/", "lib/", "lib32/", "lib64/", "libx32/"] {
        if p.starts_with(top) {
            return format!("usr/{p}");
        }
    }
    p.to_string()
}

/// The files of `names` that no other installed package also lists, from
/// dpkg's file lists in `info` (`<pkg>.list` or `<pkg>:<arch>.list`), as
/// merged-/usr paths relative to the root; and which of `names` were
/// installed.
pub fn package_files(
    info: &Path,
    names: &[&str],
) -> Result<(Vec<String>, std::collections::BTreeSet<String>), ImageError> {
    use std::collections::BTreeSet;
    let mut dropped = BTreeSet::new();
    let mut kept = BTreeSet::new();
    let mut found = BTreeSet::new();
    for e in fs::read_dir(info).map_err(io_at(info))? {
        let p = e.map_err(io_at(info))?.path();
        let Some(file) = p.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let Some(pkg) = file.strip_suffix(".list") else {
            continue;
        };
        let pkg = pkg.split(':').next().unwrap_or(pkg);
        let list = fs::read_to_string(&p).map_err(io_at(&p))?;
        let paths = list
            .lines()
            .filter(|l| !l.is_empty() && *l != "/.")
            .map(merged_usr);
        if names.contains(&pkg) {
            found.insert(pkg.to_string());
            dropped.extend(paths);
        } else {
            kept.extend(paths);
        }
    }
    Ok((dropped.difference(&kept).cloned().collect(), found))
}

/// Remove `rel` (a file, a link or a whole directory) under `root`; what
/// it held. Gone already is nothing.
fn remove_counted(root: &Path, rel: &str, d: &mut Dropped) -> Result<(), ImageError> {
    let p = root.join(rel);
    let Ok(meta) = fs::symlink_metadata(&p) else {
        return Ok(());
    };
    if meta.is_dir() {
        let mut todo = vec![p.clone()];
        while let Some(dir) = todo.pop() {
            for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
                let e = e.map_err(io_at(&dir))?;
                let m = e.metadata().map_err(io_at(&e.path()))?;
                if m.is_dir() {
                    todo.push(e.path());
                } else {
                    d.files += 1;
                    d.bytes += m.len();
                }
            }
        }
        fs::remove_dir_all(&p).map_err(io_at(&p))
    } else {
        d.files += 1;
        d.bytes += meta.len();
        fs::remove_file(&p).map_err(io_at(&p))
    }
}

/// Remove what a package-manager-free, read-only /usr must not carry.
pub fn strip(root: &Path) -> Result<Dropped, ImageError> {
    let mut dropped = Dropped::default();
    // Whole packages first, while dpkg's file lists are still there.
    let (files, found) = package_files(&root.join("var/lib/dpkg/info"), DROPPED_PACKAGES)?;
    let mut dirs = Vec::new();
    for f in files {
        let p = root.join(&f);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => dirs.push(p),
            Ok(_) => remove_counted(root, &f, &mut dropped)?,
            Err(_) => {}
        }
    }
    // Then their directories that are now empty, deepest first (a
    // directory another package still fills is not empty and stays).
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = fs::remove_dir(&d);
    }
    dropped.packages = found.into_iter().collect();
    for rel in DROPPED_PATHS {
        remove_counted(root, rel, &mut dropped)?;
    }
    // No package manager at run time (as on CoreOS): drop its state and tools.
    for p in [
        "var/lib/dpkg",
        "var/lib/apt",
        "var/cache/apt",
        "var/cache/debconf",
        "var/log",
        "etc/apt",
        "etc/dpkg",
        "usr/share/man",
        "usr/share/info",
        "boot",
    ] {
        let _ = fs::remove_dir_all(root.join(p));
    }
    fs::create_dir_all(root.join("var/log")).map_err(io_at(root))?;
    for dir in ["usr/bin", "usr/sbin"] {
        let d = root.join(dir);
        for e in fs::read_dir(&d).map_err(io_at(&d))?.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("apt")
                || n.starts_with("dpkg")
                || n == "update-initramfs"
                || n == "mkinitramfs"
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // Keep each package's copyright file; drop the rest of the docs.
    let doc = root.join("usr/share/doc");
    if let Ok(rd) = fs::read_dir(&doc) {
        for e in rd.filter_map(|e| e.ok()) {
            if let Ok(inner) = fs::read_dir(e.path()) {
                for f in inner.filter_map(|f| f.ok()) {
                    if f.file_name() != "copyright" {
                        let p = f.path();
                        let _ = if p.is_dir() {
                            fs::remove_dir_all(&p)
                        } else {
                            fs::remove_file(&p)
                        };
                    }
                }
            }
        }
    }
    // Per-host identity is made at first boot, never baked into an image.
    for p in [
        "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_ecdsa_key",
        "etc/ssh/ssh_host_ed25519_key",
    ] {
        let _ = fs::remove_file(root.join(p));
        let _ = fs::remove_file(root.join(format!("{p}.pub")));
    }
    fs::write(root.join("etc/machine-id"), "").map_err(io_at(root))?;
    // mmdebstrap leaves the build host's resolver in resolv.conf and writes
    // no /etc/hosts; a host must not inherit the builder's network, and
    // `localhost` must resolve without DNS (etcd's default URLs use it).
    fs::write(root.join("etc/resolv.conf"), "").map_err(io_at(root))?;
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    )
    .map_err(io_at(root))?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_package_takes_only_the_files_no_kept_package_lists() {
        let d = tempfile::tempdir().unwrap();
        let info = d.path().join("var/lib/dpkg/info");
        fs::create_dir_all(&info).unwrap();
        fs::write(
            info.join("perl.list"),
            "/.\n/usr\n/usr/bin\n/usr/bin/cpan\n/usr/share/perl/5.36/x.pm\n/bin/shared\n",
        )
        .unwrap();
        fs::write(
            info.join("libperl5.36:amd64.list"),
            "/usr/lib/x86_64-linux-gnu/libperl.so.5.36\n",
        )
        .unwrap();
        fs::write(
            info.join("perl-base.list"),
            "/.\n/usr/bin\n/usr/bin/perl\n/usr/bin/shared\n",
        )
        .unwrap();
        fs::write(info.join("perl.md5sums"), "not a list").unwrap();
        let (files, found) = package_files(&info, &["perl", "libperl5.36", "usrmerge"]).unwrap();
        // Directories come too (`strip` leaves them); `/bin/shared` is
        // perl-base's `/usr/bin/shared` in a merged /usr, so it stays.
        assert_eq!(
            files,
            vec![
                "usr".to_string(),
                "usr/bin/cpan".into(),
                "usr/lib/x86_64-linux-gnu/libperl.so.5.36".into(),
                "usr/share/perl/5.36/x.pm".into(),
            ]
        );
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            vec!["libperl5.36".to_string(), "perl".into()]
        );
    }

    #[test]
    fn removing_counts_what_went_and_a_missing_path_is_nothing() {
        let d = tempfile::tempdir().unwrap();
        let loc = d.path().join("usr/share/locale/de/LC_MESSAGES");
        fs::create_dir_all(&loc).unwrap();
        fs::write(loc.join("a.mo"), [0u8; 100]).unwrap();
        fs::write(d.path().join("usr/share/locale/locale.alias"), [0u8; 20]).unwrap();
        let mut r = Dropped::default();
        remove_counted(d.path(), "usr/share/locale", &mut r).unwrap();
        remove_counted(d.path(), "usr/bin/dnet", &mut r).unwrap();
        assert_eq!((r.files, r.bytes), (2, 120));
        assert!(!d.path().join("usr/share/locale").exists());
        assert!(d.path().join("usr/share").is_dir());
    }

    #[test]
    fn kept_modules_bring_their_dependencies_and_the_rest_goes() {
        let dep: BTreeMap<String, Vec<String>> = [
            (
                "kernel/drivers/net/vxlan/vxlan.ko",
                vec!["kernel/net/ipv6/ip6_udp_tunnel.ko"],
            ),
            ("kernel/net/ipv6/ip6_udp_tunnel.ko", vec![]),
            // Kept only because a kept driver needs it.
            (
                "kernel/drivers/scsi/fcoe/libfcoe.ko",
                vec!["kernel/drivers/usb/misc/helper.ko"],
            ),
            ("kernel/drivers/usb/misc/helper.ko", vec![]),
            ("kernel/sound/core/snd.ko", vec![]),
            (
                "kernel/drivers/net/wireless/intel/iwlwifi.ko",
                vec!["kernel/net/mac80211/mac80211.ko"],
            ),
            ("kernel/net/mac80211/mac80211.ko", vec![]),
            ("kernel/fs/hfs/hfs.ko", vec![]),
            ("kernel/fs/overlayfs/overlay.ko", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
        .collect();
        let keep = modules_to_keep(&dep);
        let kept: Vec<&str> = keep.iter().map(String::as_str).collect();
        assert_eq!(
            kept,
            [
                "kernel/drivers/net/vxlan/vxlan.ko",
                "kernel/drivers/scsi/fcoe/libfcoe.ko",
                "kernel/drivers/usb/misc/helper.ko",
                "kernel/fs/overlayfs/overlay.ko",
                "kernel/net/ipv6/ip6_udp_tunnel.ko",
            ]
        );
    }

    #[test]
    fn corrupt_and_unknown_cache_entries_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a_1.0_amd64.deb"), b"good").unwrap();
        fs::write(d.path().join("b_1.0_amd64.deb"), b"good too").unwrap();
        record_deb_cache(d.path()).unwrap();
        fs::write(d.path().join("b_1.0_amd64.deb"), b"flipped").unwrap();
        fs::write(d.path().join("stray"), b"?").unwrap();
        fs::create_dir(d.path().join("partial")).unwrap();
        assert_eq!(verify_deb_cache(d.path()).unwrap(), 2);
        assert!(d.path().join("a_1.0_amd64.deb").exists());
        assert!(!d.path().join("b_1.0_amd64.deb").exists());
        assert!(!d.path().join("partial").exists());
    }
}
