//! Loop devices for tests on real block devices, detached on drop (also
//! when the test fails).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::proc;

pub struct Loop {
    /// The device, e.g. `/dev/loop3`.
    pub dev: String,
}

impl Loop {
    /// `losetup --find --show` on `file`, optionally a window of it
    /// (`offset` and `size` in bytes). Panics with losetup's words: a test
    /// that needs a loop device and gets none must fail loudly.
    pub fn attach(file: &Path, window: Option<(u64, u64)>) -> Loop {
        let mut c = Command::new("losetup");
        c.args(["--find", "--show"]);
        if let Some((off, size)) = window {
            c.args(["-o", &off.to_string(), "--sizelimit", &size.to_string()]);
        }
        c.arg(file);
        let o = proc::output(&mut c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            o.status.success(),
            "losetup {}: {}",
            file.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Loop {
            dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = proc::output(
            Command::new("losetup").args(["-d", &self.dev]),
            Duration::from_secs(60),
        );
    }
}
