//! dm-verity through the device-mapper ioctls directly: the initramfs
//! carries no veritysetup.

use crate::R;
use nimbus::release::SlotDescriptor;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

pub(crate) const DM_NAME_LEN: usize = 128;

pub(crate) const DM_UUID_LEN: usize = 129;

#[repr(C)]
pub(crate) struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

#[repr(C)]
pub(crate) struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

pub(crate) const DM_READONLY_FLAG: u32 = 1;

pub(crate) fn dm_ioctl(
    cmd: u8,
    name: &str,
    flags: u32,
    payload: &[u8],
    target_count: u32,
) -> R<DmIoctl> {
    let ctl = File::options()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(|e| format!("/dev/mapper/control: {e}"))?;
    let hdr = std::mem::size_of::<DmIoctl>();
    let mut buf = vec![0u8; hdr + payload.len() + 8];
    let mut io = DmIoctl {
        version: [4, 0, 0],
        data_size: buf.len() as u32,
        data_start: hdr as u32,
        target_count,
        open_count: 0,
        flags,
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: [0; DM_NAME_LEN],
        uuid: [0; DM_UUID_LEN],
        data: [0; 7],
    };
    io.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: DmIoctl is repr(C) plain data; we copy its bytes into a buffer
    // at least as large.
    unsafe {
        std::ptr::copy_nonoverlapping(&io as *const DmIoctl as *const u8, buf.as_mut_ptr(), hdr)
    };
    buf[hdr..hdr + payload.len()].copy_from_slice(payload);
    // _IOWR(0xfd, cmd, struct dm_ioctl)
    let req = (3u64 << 30) | ((hdr as u64) << 16) | (0xfd << 8) | u64::from(cmd);
    // SAFETY: the kernel reads and writes within data_size bytes of buf.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), req as _, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(format!(
            "device-mapper ioctl {cmd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: buf holds at least hdr bytes written by us and the kernel.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const DmIoctl) })
}

pub(crate) const DM_DEV_CREATE: u8 = 3;

pub(crate) const DM_DEV_REMOVE: u8 = 4;

pub(crate) const DM_DEV_SUSPEND: u8 = 6;

pub(crate) const DM_TABLE_LOAD: u8 = 9;

/// Create a read-only dm-verity device; returns /dev/dm-N.
pub(crate) fn verity_open(name: &str, dev: &str, d: &SlotDescriptor) -> R<PathBuf> {
    let (sectors, params) = nimbus::boot::verity_table(d, dev);
    let created = dm_ioctl(DM_DEV_CREATE, name, 0, &[], 0)?;
    let mut spec = DmTargetSpec {
        sector_start: 0,
        length: sectors,
        status: 0,
        next: 0,
        target_type: [0; 16],
    };
    spec.target_type[..6].copy_from_slice(b"verity");
    let spec_len = std::mem::size_of::<DmTargetSpec>();
    let mut payload = vec![0u8; spec_len];
    // SAFETY: repr(C) plain data copied into a buffer of its exact size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &spec as *const DmTargetSpec as *const u8,
            payload.as_mut_ptr(),
            spec_len,
        )
    };
    payload.extend_from_slice(params.as_bytes());
    payload.push(0);
    while !payload.len().is_multiple_of(8) {
        payload.push(0);
    }
    if let Err(e) = dm_ioctl(DM_TABLE_LOAD, name, DM_READONLY_FLAG, &payload, 1)
        .and_then(|_| dm_ioctl(DM_DEV_SUSPEND, name, 0, &[], 0))
    {
        let _ = dm_ioctl(DM_DEV_REMOVE, name, 0, &[], 0);
        return Err(e);
    }
    let minor = ((created.dev & 0xff) | ((created.dev >> 12) & !0xff)) as u32;
    Ok(PathBuf::from(format!("/dev/dm-{minor}")))
}

pub(crate) fn verity_close(name: &str) {
    let _ = dm_ioctl(DM_DEV_REMOVE, name, 0, &[], 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structs are the kernel's ABI (linux/dm-ioctl.h): a size off by
    /// one byte and every ioctl reads the wrong fields.
    #[test]
    fn the_ioctl_structs_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<DmIoctl>(), 312);
        assert_eq!(std::mem::size_of::<DmTargetSpec>(), 40);
        assert_eq!(std::mem::offset_of!(DmIoctl, dev), 40);
        assert_eq!(std::mem::offset_of!(DmIoctl, name), 48);
        assert_eq!(std::mem::offset_of!(DmIoctl, uuid), 176);
        assert_eq!(std::mem::offset_of!(DmIoctl, data), 305);
        assert_eq!(std::mem::offset_of!(DmTargetSpec, target_type), 24);
    }
}
