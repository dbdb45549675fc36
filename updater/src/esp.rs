//! The boot disk's EFI system partition, as far as update-engine writes it:
//! the trust rotations stage 1 reads (`nimbus/trust/<n>.json` + `.sig`,
//! docs/formats.md "Trust set").
//!
//! A running host mounts the partition for the moment of the write
//! (private directory under /run, `nosuid,nodev,noexec`), writes each file
//! as durable's temp + fsync + rename + directory fsync, and unmounts. Host
//! mode (an image file) goes through mtools, as the image build does.

use std::path::{Path, PathBuf};
use std::process::Command;

use nimbus::trust::{Link, ESP_CHAIN_DIR};

use crate::error::{io_at, UpdateError};

pub trait Esp: Send + Sync {
    /// The rotation files on the ESP, as stored (not yet checked).
    fn read_chain(&self) -> Result<Vec<Link>, UpdateError>;
    /// Add rotation files, each set before its signatures.
    fn write_links(&self, links: &[Link]) -> Result<(), UpdateError>;
}

fn esp_err(what: &Path, reason: impl Into<String>) -> UpdateError {
    UpdateError::Config {
        path: what.to_path_buf(),
        reason: format!("EFI system partition: {}", reason.into()),
    }
}

/// The ESP of a running host, by its partition device.
pub struct MountedEsp {
    pub dev: PathBuf,
    /// A directory only root can enter, made for the mount.
    pub run_dir: PathBuf,
}

impl MountedEsp {
    fn with_mounted<T>(
        &self,
        write: bool,
        f: impl FnOnce(&Path) -> Result<T, UpdateError>,
    ) -> Result<T, UpdateError> {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run_dir);
        let mnt = self.run_dir.join("esp");
        match std::fs::DirBuilder::new().mode(0o700).create(&mnt) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at(&mnt)(e)),
        }
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if !write {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            Some(&self.dev),
            &mnt,
            Some("vfat"),
            flags,
            Some("umask=0077,codepage=437,iocharset=ascii"),
        )
        .map_err(|e| esp_err(&self.dev, format!("mount on {}: {e}", mnt.display())))?;
        let r = f(&mnt);
        // Unmounting flushes what the writes' fsyncs have already made
        // durable; a failure to unmount is reported, the data is safe.
        if let Err(e) = umount2(&mnt, MntFlags::empty()) {
            tracing::warn!("unmounting the ESP at {}: {e}", mnt.display());
        }
        r
    }
}

impl Esp for MountedEsp {
    fn read_chain(&self) -> Result<Vec<Link>, UpdateError> {
        self.with_mounted(false, |root| {
            nimbus::trust::read_chain_dir(&root.join(ESP_CHAIN_DIR))
                .map_err(|e| esp_err(&self.dev, e.to_string()))
        })
    }

    fn write_links(&self, links: &[Link]) -> Result<(), UpdateError> {
        self.with_mounted(true, |root| {
            let dir = root.join(ESP_CHAIN_DIR);
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            write_links_in(&dir, links)
        })
    }
}

/// Each set, then its signatures, durably: a cut between the two leaves a
/// set without signatures, which readers take as the end of the chain.
pub fn write_links_in(dir: &Path, links: &[Link]) -> Result<(), UpdateError> {
    for l in links {
        let json = dir.join(nimbus::trust::chain_file(l.version));
        let sig = dir.join(format!("{}.sig", nimbus::trust::chain_file(l.version)));
        for (p, b) in [(&json, &l.bytes), (&sig, &l.sigs)] {
            nimbus::durable::write_atomic(p, b, 0o644).map_err(|e| esp_err(p, e.to_string()))?;
        }
    }
    Ok(())
}

/// An ESP already mounted (or a plain directory standing in for one: the
/// power-cut harness records the file writes under it).
pub struct DirEsp(pub PathBuf);

impl Esp for DirEsp {
    fn read_chain(&self) -> Result<Vec<Link>, UpdateError> {
        nimbus::trust::read_chain_dir(&self.0.join(ESP_CHAIN_DIR))
            .map_err(|e| esp_err(&self.0, e.to_string()))
    }

    fn write_links(&self, links: &[Link]) -> Result<(), UpdateError> {
        let dir = self.0.join(ESP_CHAIN_DIR);
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        write_links_in(&dir, links)
    }
}

/// The ESP inside a disk image file (host mode), through mtools.
pub struct ImageEsp {
    pub image: PathBuf,
    pub offset: u64,
}

impl ImageEsp {
    fn target(&self) -> String {
        format!("{}@@{}", self.image.display(), self.offset)
    }

    fn mtool(
        &self,
        tool: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<std::process::Output, UpdateError> {
        Command::new(tool)
            .arg("-i")
            .arg(self.target())
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .map_err(|e| {
                esp_err(
                    &self.image,
                    format!("{tool}: {e} (mtools is needed in host mode)"),
                )
            })
    }
}

impl Esp for ImageEsp {
    fn read_chain(&self) -> Result<Vec<Link>, UpdateError> {
        let tmp = tempfile::tempdir().map_err(io_at(Path::new("/tmp")))?;
        let src = format!("::/{ESP_CHAIN_DIR}");
        let out = self.mtool(
            "mcopy",
            &[
                "-s".as_ref(),
                "-n".as_ref(),
                src.as_ref(),
                tmp.path().as_os_str(),
            ],
        )?;
        if !out.status.success() {
            // No rotation was ever written: no directory.
            return Ok(Vec::new());
        }
        nimbus::trust::read_chain_dir(&tmp.path().join("trust"))
            .map_err(|e| esp_err(&self.image, e.to_string()))
    }

    fn write_links(&self, links: &[Link]) -> Result<(), UpdateError> {
        let tmp = tempfile::tempdir().map_err(io_at(Path::new("/tmp")))?;
        write_links_in(tmp.path(), links)?;
        for d in ["::/nimbus", "::/nimbus/trust"] {
            // Exists already on every image but the oldest: not an error.
            let _ = self.mtool("mmd", &[d.as_ref()]);
        }
        for l in links {
            for name in [
                nimbus::trust::chain_file(l.version),
                format!("{}.sig", nimbus::trust::chain_file(l.version)),
            ] {
                let dest = format!("::/{ESP_CHAIN_DIR}/{name}");
                let out = self.mtool(
                    "mcopy",
                    &[
                        "-o".as_ref(),
                        tmp.path().join(&name).as_os_str(),
                        dest.as_ref(),
                    ],
                )?;
                if !out.status.success() {
                    return Err(esp_err(
                        &self.image,
                        format!(
                            "mcopy {dest}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    ));
                }
            }
        }
        std::fs::File::options()
            .write(true)
            .open(&self.image)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&self.image))
    }
}
