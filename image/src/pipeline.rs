//! `cargo xtask build-image`: the whole build, stage by stage.
//!
//! Every input is checked before anything large is written; every artifact
//! is written under a temporary name in the output directory and renamed
//! into place only when the whole build succeeded.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nimbus::gpt::Disk;
use nimbus::keys::{ReleaseKey, TrustStore};
use nimbus::layout::{self, Slot};
use nimbus::release::SlotDescriptor;
use nimbus::slots::Prio;
use semver::Version;
use uuid::Uuid;

use crate::cpio::Cpio;
use crate::rootfs::{self, RootfsSpec};
use crate::usr::{self, Compression, PayloadInfo};
use crate::{bios, esp, run_tool, sha256_file, ImageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Box,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "box" => Ok(Format::Box),
            _ => Err(format!("unknown format {s:?}: use raw, qcow2 or box")),
        }
    }
}

/// A file to install into the image.
#[derive(Debug, Clone)]
pub struct Install {
    /// Absolute path inside the image, e.g. /usr/bin/cloud-config.
    pub dest: String,
    pub source: PathBuf,
    pub mode: u32,
}

/// A systemd unit shipped in /usr/lib/systemd/system and enabled through
/// its [Install] section.
#[derive(Debug, Clone)]
pub struct UnitFile {
    pub name: String,
    pub content: String,
}

#[derive(Clone)]
pub struct BuildOptions {
    pub version: Version,
    pub channel: String,
    /// Release key directories; every key signs the USR descriptor.
    pub key_dirs: Vec<PathBuf>,
    /// The built-in trust set (USR and stage 1); without it, the signing
    /// keys with threshold 1, version 1.
    pub trust: Option<PathBuf>,
    pub dev_key: bool,
    pub usr_size: u64,
    pub disk_size: u64,
    pub user_data: Option<PathBuf>,
    /// Files for the OEM partition's root, by their names (platform agents
    /// and their data, as on Flatcar's OEM partition).
    pub oem_files: Vec<PathBuf>,
    pub formats: Vec<Format>,
    pub out: PathBuf,
    pub cache: PathBuf,
    pub epoch: u64,
    pub compression: Compression,
    pub zstd_level: i32,
    pub server: String,
    pub installs: Vec<Install>,
    pub units: Vec<UnitFile>,
    /// The stage-1 /init, once the boot selector exists (issue #4).
    pub stage1_init: Option<PathBuf>,
    pub rootfs: RootfsSpec,
    /// Keep `<out>/.work` (the USR tree, partition images) for benchmarks.
    pub keep_work: bool,
}

pub trait Progress {
    fn start(&mut self, stage: &str);
    fn finish(&mut self, stage: &str, seconds: f64, note: &str);
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
    pub note: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildReport {
    pub version: String,
    pub channel: String,
    pub key_ids: Vec<String>,
    pub trust_version: u64,
    pub dev_key: bool,
    pub source_date_epoch: u64,
    pub kernel: String,
    pub disk_size: u64,
    pub usr_size: u64,
    pub usr_compression: Compression,
    pub usr_data_size: u64,
    pub usr_hash_size: u64,
    pub verity_root: String,
    pub usr_slot_sha256: String,
    pub payload: PayloadInfo,
    pub rootfs_cache: String,
    pub stage1_init: bool,
    pub artifacts: Vec<Artifact>,
    pub stages: Vec<StageTime>,
    pub total_seconds: f64,
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    }
}

fn seeded(version: &Version, what: &str) -> Uuid {
    const NS: Uuid = uuid::uuid!("6e696d62-7573-4000-8000-696d61676500");
    Uuid::new_v5(&NS, format!("{version}/{what}").as_bytes())
}

struct Stages<'p> {
    progress: &'p mut dyn Progress,
    times: Vec<StageTime>,
}

impl Stages<'_> {
    fn run<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), ImageError>,
    ) -> Result<T, ImageError> {
        self.progress.start(name);
        let t = Instant::now();
        let (v, note) = f()?;
        let secs = t.elapsed().as_secs_f64();
        self.progress.finish(name, secs, &note);
        self.times.push(StageTime {
            stage: name.into(),
            seconds: (secs * 1000.0).round() / 1000.0,
            note,
        });
        Ok(v)
    }
}

/// Checks that need no large writes: run them first.
pub fn preflight(o: &BuildOptions) -> Result<Signing, ImageError> {
    if !nimbus::release::valid_channel_name(&o.channel) {
        return Err(ImageError::Invalid(format!(
            "--channel {:?} is not a valid channel name ([a-z0-9._-])",
            o.channel
        )));
    }
    layout::plan(o.disk_size, o.usr_size)
        .map_err(|e| ImageError::Invalid(format!("--disk-size/--usr-size: {e}")))?;
    if o.formats.is_empty() {
        return Err(ImageError::Invalid("--formats is empty".into()));
    }
    let signing = signing(o)?;
    if let Some(ud) = &o.user_data {
        let text = fs::read_to_string(ud).map_err(io_at(ud))?;
        if !(text.starts_with("#cloud-config") || text.starts_with("#!")) {
            return Err(ImageError::Invalid(format!(
                "--user-data {}: neither #cloud-config nor a #! script",
                ud.display()
            )));
        }
    }
    for f in &o.oem_files {
        if !f.is_file() {
            return Err(ImageError::Invalid(format!(
                "--oem-file {}: not a file",
                f.display()
            )));
        }
    }
    for i in &o.installs {
        if !i.source.is_file() {
            return Err(ImageError::Invalid(format!(
                "{}: missing (to be installed as {})",
                i.source.display(),
                i.dest
            )));
        }
    }
    fs::create_dir_all(&o.out).map_err(|e| {
        ImageError::Invalid(format!("--out {}: cannot create: {e}", o.out.display()))
    })?;
    let probe = o.out.join(".write-probe");
    fs::write(&probe, b"").map_err(|e| {
        ImageError::Invalid(format!("--out {}: not writable: {e}", o.out.display()))
    })?;
    let _ = fs::remove_file(&probe);
    Ok(signing)
}

/// The keys that sign this build and the trust set it carries.
pub struct Signing {
    pub keys: Vec<ReleaseKey>,
    pub trust: TrustStore,
}

impl Signing {
    pub fn key_refs(&self) -> Vec<&ReleaseKey> {
        self.keys.iter().collect()
    }

    pub fn trust_json(&self) -> Vec<u8> {
        nimbus::trust::TrustDoc::from_store(&self.trust).to_bytes()
    }
}

fn signing(o: &BuildOptions) -> Result<Signing, ImageError> {
    if o.key_dirs.is_empty() {
        return Err(ImageError::Invalid("no --key given".into()));
    }
    let mut keys: Vec<ReleaseKey> = Vec::new();
    for d in &o.key_dirs {
        if !d.is_dir() {
            return Err(ImageError::Invalid(format!(
                "--key {}: no such directory (create one with `cargo xtask keygen --out DIR`)",
                d.display()
            )));
        }
        let k = ReleaseKey::load_dir(d).map_err(|e| ImageError::Invalid(format!("--key: {e}")))?;
        if keys.iter().any(|x| x.id == k.id) {
            return Err(ImageError::Invalid(format!(
                "--key {}: key {} is given twice",
                d.display(),
                k.id
            )));
        }
        keys.push(k);
    }
    let trust = match &o.trust {
        Some(p) => {
            nimbus::trust::load(p).map_err(|e| ImageError::Invalid(format!("--trust: {e}")))?
        }
        None => {
            let mut t = TrustStore::new(keys.iter().map(|k| k.public()), 1);
            t.version = 1;
            t
        }
    };
    // The build must boot under its own trust set: enough of the signing
    // keys must be in it. Checked now, not after a 5-minute build.
    let trusted = keys
        .iter()
        .filter(|k| trust.keys.contains_key(&k.id))
        .count();
    if trusted < trust.threshold {
        return Err(ImageError::Invalid(format!(
            "the trust set ({}) needs {} signatures but only {trusted} of the --key keys are in it",
            trust.summary(),
            trust.threshold
        )));
    }
    Ok(Signing { keys, trust })
}

fn customize(
    o: &BuildOptions,
    root: &Path,
    signing: &Signing,
    kver: &str,
) -> Result<rootfs::ModuleReport, ImageError> {
    let w = |p: &Path, data: &[u8]| -> Result<(), ImageError> {
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).map_err(io_at(d))?;
        }
        fs::write(p, data).map_err(io_at(p))
    };
    // Kernel and modules update together with userland: the kernel lives in USR.
    let boot = root.join("usr/lib/nimbus/boot");
    fs::create_dir_all(&boot).map_err(io_at(&boot))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{kver}"));
    fs::copy(&vmlinuz, boot.join("vmlinuz")).map_err(io_at(&vmlinuz))?;
    rootfs::strip(root)?;
    let modules = rootfs::prune_modules(root, kver, STAGE1_MODULES)?;
    for i in &o.installs {
        let dest = root.join(i.dest.trim_start_matches('/'));
        if let Some(d) = dest.parent() {
            fs::create_dir_all(d).map_err(io_at(d))?;
        }
        fs::copy(&i.source, &dest).map_err(io_at(&i.source))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dest, fs::Permissions::from_mode(i.mode)).map_err(io_at(&dest))?;
    }
    let unitdir = root.join("usr/lib/systemd/system");
    for u in &o.units {
        w(&unitdir.join(&u.name), u.content.as_bytes())?;
        // Enabled in /usr (vendor links, as Flatcar does), not /etc: /etc is
        // on ROOT and only seeded on first boot, so a unit that an update
        // adds would otherwise never start on existing hosts.
        for (target, kind) in nimbus::units::install_targets(&u.content) {
            let d = unitdir.join(format!("{target}{kind}"));
            fs::create_dir_all(&d).map_err(io_at(&d))?;
            let link = d.join(&u.name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("../{}", u.name), &link).map_err(io_at(&link))?;
        }
    }
    // Docker starts on every host, also on one updated from a release
    // without it (its package enabled it only in the seed /etc).
    for (wants, unit) in [
        ("multi-user.target.wants", "docker.service"),
        ("sockets.target.wants", "docker.socket"),
    ] {
        if unitdir.join(unit).exists() {
            let d = unitdir.join(wants);
            fs::create_dir_all(&d).map_err(io_at(&d))?;
            let link = d.join(unit);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("../{unit}"), &link).map_err(io_at(&link))?;
        }
    }
    // The journal persists on ROOT, as on Flatcar: after a rollback or a
    // stalled rolling update the operator reads the boot that failed
    // (`journalctl -b -1`), which a volatile journal lost with the reboot.
    // Capped so that logs never fill ROOT (and out of RAM: /run is memory).
    w(
        &root.join("usr/lib/systemd/journald.conf.d/10-nimbus.conf"),
        b"# Nimbus default: a persistent journal on ROOT, capped.\n[Journal]\nStorage=persistent\nSystemMaxUse=64M\n",
    )?;
    // Networking: DHCP on every wired NIC through systemd-networkd (in the
    // systemd package), so update-engine reaches its server on first boot.
    // Operators override it with a .network file in /etc/systemd/network.
    w(
        &root.join("usr/lib/systemd/network/80-nimbus-dhcp.network"),
        b"# Nimbus default: DHCP on wired NICs.\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )?;
    for (wants, unit) in [
        ("multi-user.target.wants", "systemd-networkd.service"),
        ("sockets.target.wants", "systemd-networkd.socket"),
    ] {
        let target = format!("/lib/systemd/system/{unit}");
        if root.join(target.trim_start_matches('/')).exists() {
            let d = root.join("etc/systemd/system").join(wants);
            fs::create_dir_all(&d).map_err(io_at(&d))?;
            let link = d.join(unit);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).map_err(io_at(&link))?;
        }
    }
    w(
        &root.join("usr/share/nimbus/update.conf"),
        format!("# Defaults of this image; override in /etc/nimbus/update.conf.\nGROUP={}\nSERVER={}\nREBOOT_STRATEGY=reboot\n", o.channel, o.server).as_bytes(),
    )?;
    w(&root.join(nimbus::paths::TRUST_USR), &signing.trust_json())?;
    let os_release = format!(
        "NAME=\"Nimbus\"\nID=nimbus\nID_LIKE=coreos\nVERSION={v}\nVERSION_ID={v}\nPRETTY_NAME=\"Nimbus {v} ({c})\"\nNIMBUS_CHANNEL={c}\nNIMBUS_RELEASE_KEY={k}\nNIMBUS_DEV_KEY={d}\n",
        v = o.version,
        c = o.channel,
        k = signing
            .keys
            .iter()
            .map(|k| k.id.to_string())
            .collect::<Vec<_>>()
            .join(","),
        d = if o.dev_key { "yes" } else { "no" }
    );
    w(&root.join("usr/lib/os-release"), os_release.as_bytes())?;
    // The login banner (agetty expands \n to the host name, \l to the tty).
    let issue = format!("Nimbus {} ({}) \\n \\l\n\n", o.version, o.channel);
    w(&root.join("etc/issue"), issue.as_bytes())?;
    w(
        &root.join("etc/issue.net"),
        format!("Nimbus {}\n", o.version).as_bytes(),
    )?;
    // CoreOS: members of `sudo` (cloud-config puts `core` there) need no
    // password.
    let sudoers = root.join("etc/sudoers.d/nimbus");
    w(&sudoers, b"# Nimbus: as on CoreOS, the sudo group (core) needs no password.\n%sudo ALL=(ALL:ALL) NOPASSWD: ALL\n")?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&sudoers, fs::Permissions::from_mode(0o440))
            .map_err(io_at(&sudoers))?;
    }
    // CoreOS's unit for applying one cloud-config file: Vagrant's coreos
    // guest sets the host name through it (`config.vm.hostname`).
    w(
        &root.join("usr/lib/systemd/system/system-cloudinit@.service"),
        b"[Unit]\nDescription=Apply the cloud-config file %f\nAfter=cloud-config.service\n\n[Service]\nType=oneshot\nExecStart=/usr/bin/cloud-config apply %f\n",
    )?;
    let etc_os = root.join("etc/os-release");
    let _ = fs::remove_file(&etc_os);
    std::os::unix::fs::symlink("../usr/lib/os-release", &etc_os).map_err(io_at(&etc_os))?;
    // A blank ROOT is repopulated from this at first boot (systemd's factory
    // convention).
    let factory = root.join("usr/share/factory");
    fs::create_dir_all(&factory).map_err(io_at(&factory))?;
    for d in ["etc", "var"] {
        run_tool(
            Command::new("cp")
                .args(["-a"])
                .arg(root.join(d))
                .arg(factory.join(d)),
            "cp",
        )?;
    }
    Ok(modules)
}

/// What stage 1 loads (their dependencies are found in modules.dep).
// crc32c_generic first: libcrc32c (needed by erofs and ext4) asks the
// crypto API for "crc32c" when it loads, and stage 1 has no modprobe
// to satisfy that request on demand.
pub const STAGE1_MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "dm_mod",
    "dm_verity",
    "erofs",
    "ext4",
    // UEFI: systemd-boot's LoaderDevicePartUUID names the boot disk.
    "efivarfs",
    // The ESP, for the trust rotations update-engine leaves there.
    "vfat",
    "nls_cp437",
    "nls_ascii",
];

/// The kernel modules stage-1 loads, dependencies first, as paths relative
/// to /lib/modules/<kver>.
pub fn stage1_modules(root: &Path, kver: &str) -> Result<Vec<String>, ImageError> {
    let dir = root.join("usr/lib/modules").join(kver);
    let deps = rootfs::read_modules_dep(&dir)?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let norm = |p: &str| rootfs::module_file(p);
    let mut order: Vec<String> = Vec::new();
    fn visit(
        m: &str,
        deps: &std::collections::BTreeMap<String, Vec<String>>,
        order: &mut Vec<String>,
    ) {
        if order.iter().any(|x| x == m) {
            return;
        }
        // modules.dep lists dependencies so that the last must load first.
        for d in deps.get(m).into_iter().flatten().rev() {
            visit(d, deps, order);
        }
        order.push(m.to_string());
    }
    for w in STAGE1_MODULES {
        let file = format!("{w}.ko");
        match deps.keys().find(|k| norm(k) == file) {
            Some(k) => visit(k, &deps, &mut order),
            None if builtin.lines().any(|l| norm(l) == file) => {}
            None => {
                return Err(ImageError::Invalid(format!(
                    "kernel {kver} has no module {w} (neither loadable nor built in)"
                )))
            }
        }
    }
    Ok(order)
}

fn stage1_initramfs(
    o: &BuildOptions,
    root: &Path,
    kver: &str,
    signing: &Signing,
) -> Result<Vec<u8>, ImageError> {
    let mods = stage1_modules(root, kver)?;
    let mut c = Cpio::new(Vec::new(), o.epoch as u32);
    let e = |r: std::io::Result<()>| {
        r.map_err(|source| ImageError::Io {
            path: "stage1.img".into(),
            source,
        })
    };
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "sysroot",
        "etc",
        "etc/nimbus",
        "lib",
        "lib/modules",
    ] {
        e(c.dir(d))?;
    }
    e(c.chardev("dev/console", 5, 1))?;
    e(c.dir(&format!("lib/modules/{kver}")))?;
    let mut made = std::collections::BTreeSet::new();
    for m in &mods {
        let mut acc = format!("lib/modules/{kver}");
        if let Some(parent) = Path::new(m).parent() {
            for comp in parent.components() {
                acc = format!("{acc}/{}", comp.as_os_str().to_string_lossy());
                if made.insert(acc.clone()) {
                    e(c.dir(&acc))?;
                }
            }
        }
        let src = root.join("usr/lib/modules").join(kver).join(m);
        let data = fs::read(&src).map_err(io_at(&src))?;
        e(c.file(&format!("lib/modules/{kver}/{m}"), 0o644, &data))?;
    }
    e(c.file(
        "lib/modules/load.list",
        0o644,
        (mods.join("\n") + "\n").as_bytes(),
    ))?;
    e(c.file(nimbus::paths::TRUST_STAGE1, 0o644, &signing.trust_json()))?;
    if let Some(init) = &o.stage1_init {
        let data = fs::read(init).map_err(io_at(init))?;
        e(c.file("init", 0o755, &data))?;
    }
    c.finish().map_err(|source| ImageError::Io {
        path: "stage1.img".into(),
        source,
    })
}

fn mkfs_ext4(
    img: &Path,
    size: u64,
    label: &str,
    uuid: Uuid,
    dir: &Path,
    epoch: u64,
) -> Result<(), ImageError> {
    let _ = fs::remove_file(img);
    run_tool(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                label,
                "-U",
                &uuid.to_string(),
            ])
            .args(["-E", &format!("root_owner=0:0,hash_seed={uuid}")])
            .arg("-d")
            .arg(dir)
            .arg(img)
            .arg(format!("{}k", size / 1024))
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string()),
        "mkfs.ext4",
    )
}

/// Copy `src` into `dev` at `offset`, leaving all-zero 64 KiB chunks as holes.
fn copy_sparse(src: &Path, dev: &mut File, offset: u64, limit: u64) -> Result<(), ImageError> {
    use nix::unistd::{lseek, Whence};
    let mut f = File::open(src).map_err(io_at(src))?;
    let len = f.metadata().map_err(io_at(src))?.len();
    if len > limit {
        return Err(ImageError::Invalid(format!(
            "{} is {len} bytes, larger than its {limit}-byte partition",
            src.display()
        )));
    }
    // Visit only the data extents (SEEK_DATA/SEEK_HOLE): mkfs output is
    // mostly holes, and reading them back as zeros is wasted I/O.
    let errno = |e: nix::errno::Errno| ImageError::Io {
        path: src.to_path_buf(),
        source: std::io::Error::from(e),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(&f, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // no data after pos
            Err(e) => return Err(errno(e)),
        };
        let hole = lseek(&f, data, Whence::SeekHole).map_err(errno)?;
        f.seek(SeekFrom::Start(data as u64)).map_err(io_at(src))?;
        dev.seek(SeekFrom::Start(offset + data as u64))
            .map_err(io_at(src))?;
        let mut left = (hole - data) as u64;
        while left > 0 {
            let n = buf.len().min(left as usize);
            f.read_exact(&mut buf[..n]).map_err(io_at(src))?;
            dev.write_all(&buf[..n]).map_err(io_at(src))?;
            left -= n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// Vagrant's well-known insecure public key (from Vagrant's own `keys/`),
/// which every Vagrant box accepts until Vagrant replaces it.
pub const VAGRANT_INSECURE_KEY: &str = include_str!("../vagrant/insecure_key.pub");

fn vagrant_user_data() -> String {
    format!(
        "#cloud-config\n# Vagrant build: `vagrant up` logs in as core with Vagrant's insecure key\n# and replaces it with a key of its own (cloud-config keeps that change).\nssh_authorized_keys:\n  - {}\n",
        VAGRANT_INSECURE_KEY.trim()
    )
}

/// The OEM partition's ext4 image, `work/<name>.img`, holding `user_data`
/// as `user-data` when given.
fn oem_image(
    o: &BuildOptions,
    work: &Path,
    name: &str,
    size: u64,
    user_data: Option<&[u8]>,
) -> Result<PathBuf, ImageError> {
    let dir = work.join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    if let Some(ud) = user_data {
        let p = dir.join("user-data");
        fs::write(&p, ud).map_err(io_at(&p))?;
        // User-data can hold credentials: root-only on the OEM partition.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).map_err(io_at(&p))?;
    }
    for f in &o.oem_files {
        let name = f.file_name().ok_or_else(|| {
            ImageError::Invalid(format!("OEM file {}: no file name", f.display()))
        })?;
        if name == "user-data" {
            return Err(ImageError::Invalid(format!(
                "OEM file {}: user-data is given with --user-data",
                f.display()
            )));
        }
        fs::copy(f, dir.join(name)).map_err(io_at(f))?;
    }
    let img = work.join(format!("{name}.img"));
    mkfs_ext4(
        &img,
        size,
        "OEM",
        seeded(&o.version, "oem-fs"),
        &dir,
        o.epoch,
    )?;
    Ok(img)
}

fn qcow2(raw: &Path, out: &Path) -> Result<(), ImageError> {
    run_tool(
        Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd",
            ])
            .arg(raw)
            .arg(out),
        "qemu-img",
    )
}

/// The stage-1 kernel's command line on every firmware path: the kernel
/// logs to the VGA console and to ttyS0; ttyS0 comes last, so it is
/// /dev/console (what serial consoles and the tests read).
pub use nimbus::boot::KERNEL_CMDLINE;

const VAGRANTFILE: &str = r#"# Nimbus Vagrant box (libvirt provider).
Vagrant.configure("2") do |config|
  config.ssh.username = "core"
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.vm.provider :libvirt do |libvirt|
    libvirt.memory = 2048
    libvirt.cpus = 2
    # libvirt's default domain type is kvm; without a usable /dev/kvm take
    # QEMU's emulator (a Vagrantfile that sets libvirt.driver wins).
    kvm = File.exist?("/dev/kvm") && File.readable?("/dev/kvm") && File.writable?("/dev/kvm")
    libvirt.driver = "qemu" unless kvm
  end
end
"#;

/// Run the build. On failure the scratch directory and every temporary
/// artifact are removed; nothing is left under a final name.
pub fn build(o: &BuildOptions, progress: &mut dyn Progress) -> Result<BuildReport, ImageError> {
    let r = build_inner(o, progress);
    if r.is_err() {
        let _ = fs::remove_dir_all(o.out.join(".work"));
        for t in [
            ".nimbus.raw.tmp",
            ".nimbus.qcow2.tmp",
            ".nimbus.box.tmp",
            ".usr.img.zst.tmp",
        ] {
            let _ = fs::remove_file(o.out.join(t));
        }
    }
    r
}

fn build_inner(o: &BuildOptions, progress: &mut dyn Progress) -> Result<BuildReport, ImageError> {
    let t0 = Instant::now();
    let signing = preflight(o)?;
    let mut st = Stages {
        progress,
        times: Vec::new(),
    };
    let work = o.out.join(".work");
    fs::create_dir_all(&work).map_err(io_at(&work))?;
    fs::create_dir_all(&o.cache).map_err(io_at(&o.cache))?;

    let rootfs = st.run("rootfs", || {
        let r = rootfs::obtain(&o.rootfs, &o.cache, &work.join("mmdebstrap.log"))?;
        let note = if r.cache_hit {
            "cache hit".to_string()
        } else {
            format!(
                "built with mmdebstrap ({} bad cached debs dropped)",
                r.debs_dropped
            )
        };
        Ok((r, note))
    })?;
    let staging = work.join("root");
    let kver = st.run("customize", || {
        let _ = fs::remove_dir_all(&staging);
        crate::copy_tree(&rootfs.dir, &staging, crate::Metadata::Keep)?;
        let _ = fs::remove_file(staging.join(".complete"));
        let kver = rootfs::kernel_version(&staging)?;
        let m = customize(o, &staging, &signing, &kver)?;
        Ok((
            kver.clone(),
            format!(
                "kernel {kver}; modules: {} kept ({} zstd-compressed), {} removed",
                m.kept, m.compressed, m.removed
            ),
        ))
    })?;
    let kernel = fs::read(staging.join("usr/lib/nimbus/boot/vmlinuz")).map_err(io_at(&staging))?;
    let stage1 = st.run("stage1-initramfs", || {
        let b = stage1_initramfs(o, &staging, &kver, &signing)?;
        let n = format!(
            "{} KiB{}",
            b.len() / 1024,
            if o.stage1_init.is_some() {
                ""
            } else {
                ", no /init yet (boot selector: issue #4)"
            }
        );
        Ok((b, n))
    })?;

    // Stage 2 runs from the same initramfs, kexec'd from the slot's own
    // /usr/lib/nimbus/boot, so kernel, modules and init update together.
    let initramfs = staging.join("usr/lib/nimbus/boot/initramfs.img");
    fs::write(&initramfs, &stage1).map_err(io_at(&initramfs))?;

    // USR leaves the staging tree; what remains is the seed of ROOT.
    let usr_dir = work.join("usr");
    let _ = fs::remove_dir_all(&usr_dir);
    fs::rename(staging.join("usr"), &usr_dir).map_err(io_at(&usr_dir))?;
    fs::create_dir(staging.join("usr")).map_err(io_at(&staging))?;
    let slot = st.run("usr", || {
        let s = usr::build(&usr::UsrInputs {
            usr_dir: &usr_dir,
            out_fs: &work.join("usr.erofs"),
            version: &o.version,
            compression: o.compression,
            epoch: o.epoch,
            fs_uuid: seeded(&o.version, "usr-fs"),
            slot_size: o.usr_size,
            keys: &signing.key_refs(),
        })?;
        let n = format!(
            "erofs {} MiB, tree {} KiB, root {}",
            s.data_size >> 20,
            s.tree.len() >> 10,
            hex::encode(s.fields.verity_root)
        );
        Ok((s, n))
    })?;

    let payload_tmp = o.out.join(".usr.img.zst.tmp");
    let payload = st.run("payload", || {
        let p = slot.write_payload(&payload_tmp, o.zstd_level)?;
        let n = format!(
            "{} MiB -> {} MiB (zstd {})",
            p.raw_size >> 20,
            p.compressed_size >> 20,
            o.zstd_level
        );
        Ok((p, n))
    })?;

    let esp_img = work.join("esp.img");
    let oem_img = work.join("oem.img");
    let root_img = work.join("root.img");
    let plan =
        layout::plan(o.disk_size, o.usr_size).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let part = |n: u32| {
        plan.iter()
            .find(|p| p.spec.number == n)
            .copied()
            .ok_or_else(|| ImageError::Invalid(format!("layout has no partition {n}")))
    };
    // The loaders' own files, on the ESP (fixed at install: docs/boot.md).
    let sdboot_path = usr_dir.join("lib/systemd/boot/efi/systemd-bootx64.efi");
    let sdboot = fs::read(&sdboot_path).map_err(io_at(&sdboot_path))?;
    let script = bios::script(KERNEL_CMDLINE).into_bytes();
    let grub_core = st.run("filesystems", || {
        // Stage 1 as copy a, generation 1, with systemd-boot's entry and
        // GRUB's environment (nimbus::esp: how later updates add copy b).
        let mut files = nimbus::esp::initial_files(&o.version.to_string(), KERNEL_CMDLINE)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        files.push((bios::SCRIPT.to_string(), script.clone()));
        files.push((nimbus::esp::Copy::A.kernel(), kernel.clone()));
        files.push((nimbus::esp::Copy::A.initramfs(), stage1.clone()));
        files.push((nimbus::esp::EFI_LOADER.into(), sdboot.clone()));
        esp::build(
            &esp_img,
            part(1)?.size_bytes(),
            &files,
            &work.join("esp"),
            o.epoch,
        )?;
        let user_data = match &o.user_data {
            Some(ud) => Some(fs::read(ud).map_err(io_at(ud))?),
            None => None,
        };
        oem_image(o, &work, "oem", part(6)?.size_bytes(), user_data.as_deref())?;
        mkfs_ext4(
            &root_img,
            part(9)?.size_bytes(),
            "ROOT",
            seeded(&o.version, "root-fs"),
            &staging,
            o.epoch,
        )?;
        let core = bios::core_image(&work, &bios::embedded_config())?;
        Ok((
            core,
            "ESP (FAT32), GRUB i386-pc core, OEM and ROOT (ext4)".into(),
        ))
    })?;

    let raw_tmp = o.out.join(".nimbus.raw.tmp");
    let usr_slot_sha256 = st.run("disk", || {
        let _ = fs::remove_file(&raw_tmp);
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&raw_tmp)
            .map_err(io_at(&raw_tmp))?;
        f.set_len(o.disk_size).map_err(io_at(&raw_tmp))?;
        let good = Prio {
            priority: 1,
            tries: 0,
            successful: true,
        };
        Disk::create(
            &mut f,
            &raw_tmp,
            o.usr_size,
            // Every image starts pristine; stage 1 gives each host its own
            // disk, ESP, OEM and ROOT GUIDs at first boot.
            nimbus::layout::PRISTINE_DISK_GUID,
            |s| seeded(&o.version, s.label),
            |s| {
                if s.number == Slot::A.partition_number() {
                    good.apply_to(0)
                } else {
                    0
                }
            },
        )
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
        copy_sparse(
            &esp_img,
            &mut f,
            part(1)?.offset_bytes(),
            part(1)?.size_bytes(),
        )?;
        bios::install(
            &mut f,
            &raw_tmp,
            &grub_core,
            part(2)?.offset_bytes(),
            part(2)?.size_bytes(),
        )?;
        let a = part(3)?;
        let sha = slot.write_to_partition(&mut f, &raw_tmp, a.offset_bytes(), a.size_bytes())?;
        copy_sparse(
            &oem_img,
            &mut f,
            part(6)?.offset_bytes(),
            part(6)?.size_bytes(),
        )?;
        copy_sparse(
            &root_img,
            &mut f,
            part(9)?.offset_bytes(),
            part(9)?.size_bytes(),
        )?;
        f.sync_all().map_err(io_at(&raw_tmp))?;
        // Read back what was written, as a consumer would.
        let mut d = Disk::open(&mut f, &raw_tmp).map_err(|e| ImageError::Invalid(e.to_string()))?;
        d.check_nimbus_layout()
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        let desc = d
            .read_descriptor(Slot::A)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        SlotDescriptor::verify(&desc, &signing.trust).map_err(|e| {
            ImageError::Invalid(format!(
                "USR-A descriptor does not verify after writing: {e}"
            ))
        })?;
        Ok((sha, format!("{} GiB sparse", o.disk_size >> 30)))
    })?;

    let want = |f: Format| o.formats.contains(&f);
    let qcow_tmp = o.out.join(".nimbus.qcow2.tmp");
    let box_tmp = o.out.join(".nimbus.box.tmp");
    if want(Format::Qcow2) {
        st.run("qcow2", || {
            let _ = fs::remove_file(&qcow_tmp);
            qcow2(&raw_tmp, &qcow_tmp)?;
            Ok(((), String::new()))
        })?;
    }
    if want(Format::Box) {
        st.run("box", || {
            // The box differs from nimbus.raw only in its OEM partition:
            // the user-data of the Vagrant build (Vagrant's insecure key for
            // `core`, which Vagrant replaces with its own on first `up`).
            let user_data = match &o.user_data {
                Some(own) => fs::read(own).map_err(io_at(own))?,
                None => vagrant_user_data().into_bytes(),
            };
            let oem_img = oem_image(o, &work, "oem-vagrant", part(6)?.size_bytes(), Some(&user_data))?;
            let box_raw = work.join("box.raw");
            let _ = fs::remove_file(&box_raw);
            run_tool(
                Command::new("cp").arg("--sparse=always").arg(&raw_tmp).arg(&box_raw),
                "cp",
            )?;
            let mut f = File::options().write(true).open(&box_raw).map_err(io_at(&box_raw))?;
            copy_sparse(&oem_img, &mut f, part(6)?.offset_bytes(), part(6)?.size_bytes())?;
            f.sync_all().map_err(io_at(&box_raw))?;
            let box_qcow = work.join("box.qcow2");
            let _ = fs::remove_file(&box_qcow);
            qcow2(&box_raw, &box_qcow)?;
            let _ = fs::remove_file(&box_raw);
            let f = File::create(&box_tmp).map_err(io_at(&box_tmp))?;
            let mut t = tar::Builder::new(f);
            let meta = serde_json::json!({"provider": "libvirt", "format": "qcow2", "virtual_size": o.disk_size.div_ceil(1 << 30)});
            let add = |t: &mut tar::Builder<File>, name: &str, data: &[u8]| -> std::io::Result<()> {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_mtime(o.epoch);
                h.set_cksum();
                t.append_data(&mut h, name, data)
            };
            let e = io_at(&box_tmp);
            add(&mut t, "metadata.json", meta.to_string().as_bytes()).map_err(e)?;
            add(&mut t, "Vagrantfile", VAGRANTFILE.as_bytes()).map_err(io_at(&box_tmp))?;
            let mut q = File::open(&box_qcow).map_err(io_at(&box_qcow))?;
            t.append_file("box.img", &mut q).map_err(io_at(&box_tmp))?;
            t.into_inner().and_then(|f| f.sync_all()).map_err(io_at(&box_tmp))?;
            Ok(((), "OEM user-data with Vagrant's insecure key".into()))
        })?;
    }

    // Everything built: move into place.
    let mut artifacts = Vec::new();
    let mut place = |tmp: &Path, name: &str| -> Result<(), ImageError> {
        let dest = o.out.join(name);
        fs::rename(tmp, &dest).map_err(io_at(&dest))?;
        artifacts.push(Artifact {
            name: name.into(),
            size: fs::metadata(&dest).map_err(io_at(&dest))?.len(),
            sha256: sha256_file(&dest)?,
        });
        Ok(())
    };
    if want(Format::Raw) {
        place(&raw_tmp, "nimbus.raw")?;
    } else {
        let _ = fs::remove_file(&raw_tmp);
    }
    if want(Format::Qcow2) {
        place(&qcow_tmp, "nimbus.qcow2")?;
    } else {
        let _ = fs::remove_file(&qcow_tmp);
    }
    if want(Format::Box) {
        place(&box_tmp, "nimbus.box")?;
    }
    place(&payload_tmp, "usr.img.zst")?;
    if !o.keep_work {
        let _ = fs::remove_dir_all(&work);
    }

    let report = BuildReport {
        version: o.version.to_string(),
        channel: o.channel.clone(),
        key_ids: signing.keys.iter().map(|k| k.id.to_string()).collect(),
        trust_version: signing.trust.version,
        dev_key: o.dev_key,
        source_date_epoch: o.epoch,
        kernel: kver,
        disk_size: o.disk_size,
        usr_size: o.usr_size,
        usr_compression: o.compression,
        usr_data_size: slot.data_size,
        usr_hash_size: slot.tree.len() as u64,
        verity_root: hex::encode(slot.fields.verity_root),
        usr_slot_sha256,
        payload,
        rootfs_cache: if rootfs.cache_hit {
            "hit".into()
        } else {
            "miss".into()
        },
        stage1_init: o.stage1_init.is_some(),
        artifacts,
        stages: st.times,
        total_seconds: (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    };
    let json =
        serde_json::to_vec_pretty(&report).map_err(|e| ImageError::Invalid(e.to_string()))?;
    // Stage 1 beside the build: the release step publishes it, and
    // update-engine installs it into the ESP's other copy.
    let s1 = o.out.join("stage1");
    fs::create_dir_all(&s1).map_err(io_at(&s1))?;
    for (name, data) in [
        (nimbus::esp::KERNEL, &kernel),
        (nimbus::esp::INITRAMFS, &stage1),
    ] {
        nimbus::durable::write_atomic(&s1.join(name), data, 0o644)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
    }
    // The release step starts a trust rotation from the set the image
    // carries when the repository has none yet.
    nimbus::durable::write_atomic(&o.out.join("trust.json"), &signing.trust_json(), 0o644)
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    nimbus::durable::write_atomic(&o.out.join("build.json"), &json, 0o644)
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    Ok(report)
}
