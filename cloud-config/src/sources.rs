//! Where user-data comes from at boot, in the order it is applied (later
//! sources win where they overlap):
//!
//! 1. the OEM partition's `user-data` (mounted at /oem),
//! 2. QEMU fw_cfg `opt/org.nimbus/user-data`,
//! 3. a config-drive (filesystem label `config-2`, `openstack/latest/user_data`),
//! 4. `cloud-config-url=` on the kernel command line.
//!
//! Every location is a field so tests can point it at a directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Sources {
    pub oem_dir: PathBuf,
    pub fw_cfg: PathBuf,
    /// A block device to mount, or a directory already holding the drive.
    pub config_drive: PathBuf,
    pub cmdline: PathBuf,
}

impl Default for Sources {
    fn default() -> Sources {
        Sources {
            oem_dir: "/oem".into(),
            fw_cfg: "/sys/firmware/qemu_fw_cfg/by_name/opt/org.nimbus/user-data/raw".into(),
            config_drive: "/dev/disk/by-label/config-2".into(),
            cmdline: "/proc/cmdline".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub source: String,
    pub text: String,
}

fn read(path: &Path, source: &str, out: &mut Vec<Found>, errors: &mut Vec<String>) {
    if !path.exists() {
        return;
    }
    match crate::read_limited(path) {
        Ok(text) => out.push(Found {
            source: source.to_string(),
            text,
        }),
        Err(e) => errors.push(format!("{source}: {e}")),
    }
}

/// `cloud-config-url=URL` from a kernel command line.
pub fn cmdline_url(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cloud-config-url="))
        .map(str::to_string)
}

fn fetch(url: &str) -> Result<String, String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{url}: only http and https URLs are supported"));
    }
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    // The network may come up after us: a few tries with a growing pause.
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1 << attempt));
        }
        match client.get(url).send() {
            Ok(r) if r.status().is_success() => {
                if r.content_length()
                    .is_some_and(|n| n > crate::yaml::MAX_BYTES as u64)
                {
                    return Err(format!(
                        "{url}: larger than the {}-byte limit",
                        crate::yaml::MAX_BYTES
                    ));
                }
                let mut buf = Vec::new();
                use std::io::Read;
                r.take(crate::yaml::MAX_BYTES as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("{url}: {e}"))?;
                if buf.len() > crate::yaml::MAX_BYTES {
                    return Err(format!(
                        "{url}: larger than the {}-byte limit",
                        crate::yaml::MAX_BYTES
                    ));
                }
                return String::from_utf8(buf).map_err(|_| format!("{url}: not UTF-8"));
            }
            Ok(r) if r.status().is_client_error() => {
                return Err(format!("{url}: HTTP {}", r.status()))
            }
            Ok(r) => last = format!("{url}: HTTP {}", r.status()),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(last)
}

impl Sources {
    /// Everything found, in apply order, and what failed to read.
    pub fn collect(&self) -> (Vec<Found>, Vec<String>) {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        read(
            &self.oem_dir.join("user-data"),
            "oem",
            &mut out,
            &mut errors,
        );
        read(&self.fw_cfg, "fw_cfg", &mut out, &mut errors);
        if self.config_drive.is_dir() {
            read(
                &self.config_drive.join("openstack/latest/user_data"),
                "config-drive",
                &mut out,
                &mut errors,
            );
        } else if self.config_drive.exists() {
            let mnt = Path::new("/run/nimbus/config-drive");
            let mounted = std::fs::create_dir_all(mnt).is_ok()
                && Command::new("mount")
                    .args(["-o", "ro"])
                    .arg(&self.config_drive)
                    .arg(mnt)
                    .status()
                    .is_ok_and(|s| s.success());
            if mounted {
                read(
                    &mnt.join("openstack/latest/user_data"),
                    "config-drive",
                    &mut out,
                    &mut errors,
                );
                let _ = Command::new("umount").arg(mnt).status();
            } else {
                errors.push(format!(
                    "config-drive: cannot mount {}",
                    self.config_drive.display()
                ));
            }
        }
        if let Ok(cmdline) = std::fs::read_to_string(&self.cmdline) {
            if let Some(url) = cmdline_url(&cmdline) {
                match fetch(&url) {
                    Ok(text) => out.push(Found {
                        source: format!("cloud-config-url={url}"),
                        text,
                    }),
                    Err(e) => errors.push(format!("cloud-config-url: {e}")),
                }
            }
        }
        (out, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_from_cmdline() {
        assert_eq!(
            cmdline_url("quiet cloud-config-url=http://10.0.2.2:8080/ud console=ttyS0"),
            Some("http://10.0.2.2:8080/ud".into())
        );
        assert_eq!(cmdline_url("quiet"), None);
    }
}
