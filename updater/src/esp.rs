//! Reaching the boot disk's EFI system partition (`nimbus::esp` says what
//! is on it and how it changes).
//!
//! A running host mounts the partition for the moment of the work (a
//! directory under /run only root can enter; `nosuid,nodev,noexec`) and
//! writes through durable's temp + fsync + rename + directory fsync. Host
//! mode (an image file) goes through mtools, as the image build does.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use nimbus::esp::MountedEsp;
use nimbus::esp::{DirEsp, Esp, EspError, EspFs};

/// The ESP inside a disk image file (host mode, tests), through mtools.
pub struct ImageEsp {
    pub image: PathBuf,
    pub offset: u64,
}

impl Esp for ImageEsp {
    fn with(
        &self,
        _write: bool,
        f: &mut dyn FnMut(&dyn EspFs) -> Result<(), EspError>,
    ) -> Result<(), EspError> {
        f(self)?;
        std::fs::File::options()
            .write(true)
            .open(&self.image)
            .and_then(|f| f.sync_all())
            .map_err(|source| EspError::Io {
                path: self.image.clone(),
                source,
            })
    }
}

impl ImageEsp {
    fn target(&self) -> String {
        format!("{}@@{}", self.image.display(), self.offset)
    }

    fn mtool(
        &self,
        tool: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<std::process::Output, EspError> {
        Command::new(tool)
            .arg("-i")
            .arg(self.target())
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .map_err(|e| {
                EspError::Invalid(format!(
                    "{}: {tool}: {e} (mtools is needed in host mode)",
                    self.image.display()
                ))
            })
    }

    fn ok(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), EspError> {
        let o = self.mtool(tool, args)?;
        if o.status.success() {
            return Ok(());
        }
        Err(EspError::Invalid(format!(
            "{}: {tool} {:?}: {}",
            self.image.display(),
            args,
            String::from_utf8_lossy(&o.stderr).trim()
        )))
    }

    fn mkdirs(&self, rel: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            acc = format!("{acc}/{p}");
            // Exists already: not an error.
            let _ = self.mtool("mmd", &[format!("::{acc}").as_ref()]);
        }
    }
}

fn tmp() -> Result<tempfile::TempDir, EspError> {
    tempfile::tempdir().map_err(|source| EspError::Io {
        path: std::env::temp_dir(),
        source,
    })
}

impl EspFs for ImageEsp {
    fn read(&self, rel: &str, limit: usize) -> Result<Option<Vec<u8>>, EspError> {
        let t = tmp()?;
        let to = t.path().join("f");
        let o = self.mtool(
            "mcopy",
            &["-n".as_ref(), format!("::/{rel}").as_ref(), to.as_os_str()],
        )?;
        if !o.status.success() {
            return Ok(None);
        }
        DirEsp(t.path().to_path_buf()).read("f", limit)
    }

    fn list(&self, rel_dir: &str) -> Result<Vec<String>, EspError> {
        let o = self.mtool("mdir", &["-b".as_ref(), format!("::/{rel_dir}").as_ref()])?;
        if !o.status.success() {
            return Ok(Vec::new());
        }
        let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim_end_matches('/').rsplit('/').next())
            .map(str::to_string)
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect();
        v.sort();
        Ok(v)
    }

    fn replace(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        let t = tmp()?;
        let from = t.path().join("f");
        std::fs::write(&from, data).map_err(|source| EspError::Io {
            path: from.clone(),
            source,
        })?;
        self.mkdirs(rel);
        self.ok(
            "mcopy",
            &[
                "-o".as_ref(),
                from.as_os_str(),
                format!("::/{rel}").as_ref(),
            ],
        )
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), EspError> {
        // mren takes the new name without its directory.
        let name = Path::new(to)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.ok("mren", &[format!("::/{from}").as_ref(), name.as_ref()])
    }

    fn remove(&self, rel: &str) -> Result<(), EspError> {
        let o = self.mtool("mdel", &[format!("::/{rel}").as_ref()])?;
        // A missing file is not an error; anything else was reported.
        if !o.status.success() && self.read(rel, 1 << 30)?.is_some() {
            return Err(EspError::Invalid(format!(
                "mdel ::/{rel}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(())
    }
}
