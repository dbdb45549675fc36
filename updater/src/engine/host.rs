//! Where the engine runs: the disk it writes (behind [`Storage`], so the
//! power-cut harness can record and cut) and the ESP it keeps.

use std::path::{Path, PathBuf};

use nimbus::gpt::{Disk, GptError};
use nimbus::slots;

use crate::error::{io_at, UpdateError};
use crate::target::SlotDevice;

/// How the engine reaches the disk: the GPT and the slot's bytes. Files and
/// block devices in production; the power-cut harness records and cuts.
pub trait Storage: Send + Sync {
    fn gpt(&self, writable: bool) -> Result<Disk<Box<dyn nimbus::gpt::BlockDevice>>, GptError>;
    fn slot(&self, partition: u32, offset: u64, size: u64) -> Result<SlotDevice, UpdateError>;
}

/// A disk image file or a block device.
pub struct FileStorage(pub PathBuf);

impl Storage for FileStorage {
    fn gpt(&self, writable: bool) -> Result<Disk<Box<dyn nimbus::gpt::BlockDevice>>, GptError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&self.0)
            .map_err(|source| GptError::Io {
                path: self.0.clone(),
                source,
            })?;
        if writable {
            nimbus::gpt::lock_exclusive(&f, &self.0, nimbus::gpt::LOCK_WAIT)?;
        }
        Disk::open(Box::new(f) as Box<dyn nimbus::gpt::BlockDevice>, &self.0)
    }
    fn slot(&self, partition: u32, offset: u64, size: u64) -> Result<SlotDevice, UpdateError> {
        SlotDevice::open(&self.0, partition, offset, size)
    }
}

/// Where the engine runs: a real host (booted slot from the kernel command
/// line) or host mode (an image file; the slot the boot rule would pick).
#[derive(Clone)]
pub struct Host {
    pub root: PathBuf,
    pub disk: PathBuf,
    pub booted: u32,
    pub host_mode: bool,
    pub storage: std::sync::Arc<dyn Storage>,
    /// The boot disk's ESP: stage 1's copies and the trust rotations.
    pub esp: std::sync::Arc<dyn nimbus::esp::Esp>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("root", &self.root)
            .field("disk", &self.disk)
            .field("booted", &self.booted)
            .field("host_mode", &self.host_mode)
            .finish()
    }
}

impl Host {
    pub fn image(root: &Path, disk: &Path) -> Result<Host, UpdateError> {
        let d = Disk::open_path(disk, false)?;
        d.check_nimbus_layout()?;
        let mut table = d.slot_table();
        let choice = slots::select_for_boot(&mut table, &[]).ok_or_else(|| {
            UpdateError::NoBootedSlot(format!("{}: no USR slot is bootable", disk.display()))
        })?;
        let esp = d.partition(nimbus::layout::ESP_PARTITION)?;
        Ok(Host {
            root: root.to_path_buf(),
            disk: disk.to_path_buf(),
            booted: choice.number,
            host_mode: true,
            storage: std::sync::Arc::new(FileStorage(disk.to_path_buf())),
            esp: std::sync::Arc::new(crate::esp::ImageEsp {
                image: disk.to_path_buf(),
                offset: esp.offset_bytes(),
            }),
        })
    }

    /// The running system: `nimbus.usr=PARTUUID=` names the booted slot;
    /// the disk is whichever one holds a partition with that GUID. Never
    /// inferred from priorities, which say what boots next, not what runs.
    pub fn running(root: &Path) -> Result<Host, UpdateError> {
        let cmdline =
            nimbus::boot::booted_cmdline(root).map_err(io_at(Path::new("/proc/cmdline")))?;
        let args = nimbus::boot::parse_cmdline(&cmdline).ok_or_else(|| {
            UpdateError::NoBootedSlot("no nimbus.usr=PARTUUID= on the kernel command line".into())
        })?;
        // Several disks can hold this PARTUUID (a pristine copy of the
        // image attached for rescue): stage 1's `nimbus.disk=` names ours,
        // and any other disk is never touched.
        let disks = nimbus::boot::scan_disks();
        let d =
            nimbus::boot::pick_running_disk(&disks, &args).map_err(UpdateError::NoBootedSlot)?;
        let dev = PathBuf::from("/dev").join(&d.name);
        let disk =
            Disk::open_path(&dev, false).map_err(|e| UpdateError::NoBootedSlot(e.to_string()))?;
        let p = disk
            .partitions()
            .into_iter()
            .find(|p| p.uuid == args.partuuid)
            .ok_or_else(|| {
                UpdateError::NoBootedSlot(format!(
                    "{}: no partition with PARTUUID {}",
                    dev.display(),
                    args.partuuid
                ))
            })?;
        let (_, esp_dev) = nimbus::boot::partition_device(&d.name, nimbus::layout::ESP_PARTITION)
            .map_err(UpdateError::NoBootedSlot)?;
        Ok(Host {
            root: root.to_path_buf(),
            storage: std::sync::Arc::new(FileStorage(dev.clone())),
            disk: dev,
            booted: p.number,
            host_mode: false,
            esp: std::sync::Arc::new(crate::esp::MountedEsp {
                dev: esp_dev,
                mnt: root.join(nimbus::paths::ENGINE_MOUNTS).join("esp"),
            }),
        })
    }
}
