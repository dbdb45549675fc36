//! Partition images (ROOT and OEM as ext4), the raw disk they go into with
//! its GPT and loaders, and its qcow2 form.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use nimbus::gpt::Disk;
use nimbus::layout::{Placed, Slot};
use nimbus::release::SlotDescriptor;
use nimbus::slots::Prio;
use uuid::Uuid;

use super::{io_at, seeded, BuildOptions, Signing};
use crate::usr::UsrSlot;
use crate::{bios, run_tool, ImageError};

/// Partition `n` of the layout.
pub(super) fn part(plan: &[Placed], n: u32) -> Result<Placed, ImageError> {
    plan.iter()
        .find(|p| p.spec.number == n)
        .copied()
        .ok_or_else(|| ImageError::Invalid(format!("layout has no partition {n}")))
}

/// The partition images of one build, ready to go into a disk.
pub(super) struct Parts<'a> {
    pub esp: &'a Path,
    pub grub_core: &'a [u8],
    pub slot: &'a UsrSlot,
    pub oem: &'a Path,
    pub root: &'a Path,
}

/// Write the raw disk `raw` (a new file): the GPT with USR-A good and
/// pristine GUIDs, the ESP, GRUB's core image, USR-A, OEM and ROOT; then
/// read it back as a consumer would and verify USR-A's descriptor.
/// Returns USR-A's sha256.
pub(super) fn write_disk(
    o: &BuildOptions,
    plan: &[Placed],
    raw: &Path,
    parts: &Parts<'_>,
    signing: &Signing,
) -> Result<String, ImageError> {
    let _ = fs::remove_file(raw);
    let mut f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(raw)
        .map_err(io_at(raw))?;
    f.set_len(o.disk_size).map_err(io_at(raw))?;
    let good = Prio {
        priority: 1,
        tries: 0,
        successful: true,
    };
    Disk::create(
        &mut f,
        raw,
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
    let esp = part(plan, 1)?;
    copy_sparse(parts.esp, &mut f, esp.offset_bytes(), esp.size_bytes())?;
    let bios_boot = part(plan, 2)?;
    bios::install(
        &mut f,
        raw,
        parts.grub_core,
        bios_boot.offset_bytes(),
        bios_boot.size_bytes(),
    )?;
    let a = part(plan, 3)?;
    let sha = parts
        .slot
        .write_to_partition(&mut f, raw, a.offset_bytes(), a.size_bytes())?;
    let oem = part(plan, 6)?;
    copy_sparse(parts.oem, &mut f, oem.offset_bytes(), oem.size_bytes())?;
    let root = part(plan, 9)?;
    copy_sparse(parts.root, &mut f, root.offset_bytes(), root.size_bytes())?;
    f.sync_all().map_err(io_at(raw))?;
    // Read back what was written, as a consumer would.
    let mut d = Disk::open(&mut f, raw).map_err(|e| ImageError::Invalid(e.to_string()))?;
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
    Ok(sha)
}

pub(super) fn mkfs_ext4(
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
pub(super) fn copy_sparse(
    src: &Path,
    dev: &mut File,
    offset: u64,
    limit: u64,
) -> Result<(), ImageError> {
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
/// The OEM partition's ext4 image, `work/<name>.img`, holding `user_data`
/// as `user-data` when given.
pub(super) fn oem_image(
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

pub(super) fn qcow2(raw: &Path, out: &Path) -> Result<(), ImageError> {
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
