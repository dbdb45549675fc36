//! Crash-safe file replacement: write a temp file beside the target, fsync it,
//! rename it over the target, fsync the directory. After a power cut the file
//! holds either the old or the new bytes, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {op}: {source}")]
pub struct DurableError {
    pub path: PathBuf,
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

fn err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |source| DurableError {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Replace `path` with `data`, created with `mode` (e.g. 0o600 for secrets).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), DurableError> {
    write_atomic_owned(path, data, mode, None)
}

/// As [`write_atomic`], and also set the owner (uid, gid). Mode and owner are
/// set on the temp file before the rename, so the file never appears with
/// the wrong ones, and the mode ignores the umask.
pub fn write_atomic_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), DurableError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| DurableError {
            path: path.to_path_buf(),
            op: "name",
            source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err(&tmp, "create"))?;
        f.write_all(data).map_err(err(&tmp, "write"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(err(&tmp, "chown"))?;
        }
        // After chown: chown clears setuid/setgid bits.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err(&tmp, "chmod"))?;
        f.sync_all().map_err(err(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(err(path, "rename"))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Make a rename or create in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_and_sets_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_dir_names_the_path() {
        let e = write_atomic(Path::new("/nonexistent-nimbus/x"), b"", 0o644).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-nimbus/"), "{e}");
    }
}
