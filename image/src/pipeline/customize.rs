//! The customize stage: the root filesystem made into Nimbus (kernel into
//! USR, modules pruned, Nimbus's binaries and units, defaults, the factory
//! copy of /etc and /var), and stage 1's initramfs.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::{io_at, BuildOptions, Signing};
use crate::cpio::Cpio;
use crate::rootfs;
use crate::{run_tool, ImageError};

pub(super) fn customize(
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
    let dropped = rootfs::strip(root)?;
    let mut modules = rootfs::prune_modules(root, kver, STAGE1_MODULES)?;
    modules.dropped = dropped;
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
    // Docker is socket-activated, as on CoreOS: docker.socket listens on
    // every host (enabled from /usr, so also on hosts updated from a release
    // without Docker); dockerd, and containerd which it wants, start on the
    // first `docker` call, at boot where a unit or the swarm wants them, or
    // where containers were left (nimbus-docker-resume.service). A fresh
    // host that runs no container pays nothing for them (docs/image.md).
    let unit = "docker.socket";
    if unitdir.join(unit).exists() {
        let d = unitdir.join("sockets.target.wants");
        fs::create_dir_all(&d).map_err(io_at(&d))?;
        let link = d.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("../{unit}"), &link).map_err(io_at(&link))?;
    }
    unwant_seeded(root)?;
    // The journal persists on ROOT, as on Flatcar: after a rollback or a
    // stalled rolling update the operator reads the boot that failed
    // (`journalctl -b -1`), which a volatile journal lost with the reboot.
    // Capped so that logs never fill ROOT (and out of RAM: /run is memory).
    w(
        &root.join("usr/lib/systemd/journald.conf.d/10-nimbus.conf"),
        b"# Nimbus default: a persistent journal on ROOT, capped.\n[Journal]\nStorage=persistent\nSystemMaxUse=64M\n",
    )?;
    // The group whose members may steer update-engine like root (updatectl's
    // changes, D-Bus's AttemptUpdate: updater/src/access.rs), made by
    // systemd-sysusers on the first boot; the D-Bus policy names it.
    w(
        &root.join("usr/lib/sysusers.d/nimbus.conf"),
        b"# Nimbus: members may steer update-engine (docs/update-engine.md).\ng nimbus-admin -\n",
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

pub(super) fn stage1_initramfs(
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

/// Units Debian's packages enabled in the seed /etc that a fresh Nimbus host
/// must not start on its own: Docker and containerd (socket-activated
/// instead), etcd (wanted only where configured: cloud-config's
/// `wants_local_etcd`, docs/cluster.md), and dpkg's daily backup of a
/// package database that USR does not carry.
const UNWANTED: &[&str] = &[
    "docker.service",
    "containerd.service",
    nimbus::units::ETCD,
    "dpkg-db-backup.timer",
];

/// Drop the seed /etc's links to `UNWANTED` units, and links whose unit
/// went with a package that USR leaves out (apt's and dpkg's timers), which
/// systemd would report as missing at every boot.
fn unwant_seeded(root: &Path) -> Result<(), ImageError> {
    let etc = root.join("etc/systemd/system");
    let Ok(dirs) = fs::read_dir(&etc) else {
        return Ok(());
    };
    for d in dirs {
        let d = d.map_err(io_at(&etc))?.path();
        let is_wants = d
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".wants") || n.ends_with(".requires"));
        if !is_wants {
            continue;
        }
        for l in fs::read_dir(&d).map_err(io_at(&d))? {
            let l = l.map_err(io_at(&d))?.path();
            let Ok(target) = fs::read_link(&l) else {
                continue;
            };
            let name = l.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Targets are absolute paths of the booted system; resolve
            // them inside the image's root.
            let in_root = root.join(target.strip_prefix("/").unwrap_or(&target));
            let dangling = target.is_absolute() && fs::symlink_metadata(&in_root).is_err();
            if UNWANTED.contains(&name) || dangling {
                fs::remove_file(&l).map_err(io_at(&l))?;
            }
        }
    }
    Ok(())
}
