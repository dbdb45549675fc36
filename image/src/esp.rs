//! The EFI system partition: FAT32 from dosfstools' `mkfs.fat`, filled with
//! mtools' `mcopy` (no mount needed, which this host kernel could not do
//! anyway). The `fatfs` crate was tried first: its newest release (0.3.6)
//! writes long-name entries where `.` and `..` belong in every new
//! directory, and `fsck.vfat` rejects the result (see docs/image.md).
//!
//! Contents: systemd-boot as the removable-media loader
//! (`EFI/BOOT/BOOTX64.EFI`), stage 1 as copy a with its entry, and GRUB's
//! environment block (the layout and its later changes: `nimbus::esp`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_tool, ImageError};

/// Files to place, as (path inside the ESP, bytes).
pub type EspFiles = Vec<(String, Vec<u8>)>;

/// Write a FAT32 image of `size` bytes at `out` holding `files`.
/// `staging` is a scratch directory.
pub fn build(
    out: &Path,
    size: u64,
    files: &EspFiles,
    staging: &Path,
    mtime: u64,
) -> Result<(), ImageError> {
    let _ = fs::remove_dir_all(staging);
    let io = |p: &Path| {
        let p: PathBuf = p.to_path_buf();
        move |source| ImageError::Io { path: p, source }
    };
    let mut top: Vec<PathBuf> = Vec::new();
    for (path, data) in files {
        let dest = staging.join(path.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::write(&dest, data).map_err(io(&dest))?;
        let first = staging.join(
            path.trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default(),
        );
        if !top.contains(&first) {
            top.push(first);
        }
    }
    // Fixed timestamps so the ESP's bytes depend only on its contents.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
    for (path, _) in files {
        let p = staging.join(path.trim_start_matches('/'));
        if let Ok(f) = fs::File::options().write(true).open(&p) {
            let _ = f.set_modified(t);
        }
    }
    let _ = fs::remove_file(out);
    run_tool(
        Command::new("mkfs.fat")
            // --invariant: fixed volume id and boot-sector times.
            .args(["-F", "32", "-n", "EFI-SYSTEM", "--invariant", "-C"])
            .arg(out)
            .arg((size / 1024).to_string()),
        "mkfs.fat",
    )?;
    top.sort();
    let mut mcopy = Command::new("mcopy");
    mcopy.args(["-s", "-m", "-i"]).arg(out).args(&top).arg("::");
    run_tool(mcopy.env("MTOOLS_SKIP_CHECK", "1"), "mcopy")?;
    Ok(())
}
