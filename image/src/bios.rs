//! BIOS boot: GRUB's i386-pc boot sector in the MBR and its core image in
//! the BIOS-BOOT partition, both from Debian's `grub-pc-bin`, written into
//! the image file directly (what `grub-bios-setup` does, without a device
//! map, a mount or a probe of the build host's disks).
//!
//! The core image carries every module it needs and an embedded
//! configuration that loads the same stage-1 kernel and initramfs from the
//! ESP as systemd-boot does under UEFI. It never reads `normal.mod` or a
//! `grub.cfg`: there is nothing on the disk for it to get wrong, and no
//! menu to wait on.
//!
//! Offsets patched (GRUB 2.06 `include/grub/i386/pc/boot.h`,
//! `util/setup.c`):
//! - boot.img `0x5c`: LBA (u64) of the core image's first sector;
//! - boot.img `0x66`: the "boot drive check" jump, replaced by two NOPs for
//!   hard disks (some BIOSes pass a wrong DL);
//! - boot.img keeps the disk's own BPB area (`0x03..0x5a`) and partition
//!   table with disk signature (`0x1b8..0x1fe`), i.e. the protective MBR;
//! - diskboot.img (core sector 0) `0x1f4`: the first block list entry, start
//!   LBA (u64) of the rest of the core image; its length was set by
//!   grub-mkimage.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use crate::{run_tool, ImageError};

/// Where Debian's `grub-pc-bin` puts the i386-pc images and modules.
pub const GRUB_PC_DIR: &str = "/usr/lib/grub/i386-pc";

/// Built into the core image; no module is loaded from disk at boot.
/// `normal` runs the script on the ESP (the embedded configuration runs
/// under GRUB's rescue parser, which has no `if`).
const MODULES: &[&str] = &[
    "biosdisk", "part_gpt", "fat", "linux", "boot", "echo", "probe", "serial", "terminal", "test",
    "loadenv", "normal",
];

const SECTOR: usize = 512;
const KERNEL_SECTOR: usize = 0x5c;
const DRIVE_CHECK: usize = 0x66;
const BPB: std::ops::Range<usize> = 0x03..0x5a;
const PART_TABLE: std::ops::Range<usize> = 0x1b8..0x1fe;
const BLOCKLIST_START: usize = SECTOR - 12;
const BLOCKLIST_LEN: usize = SECTOR - 4;

/// The embedded configuration (GRUB's rescue syntax: plain commands).
/// `(hd0)` is the disk the BIOS booted, so the ESP read is always the boot
/// disk's; its PARTUUID goes to stage 1, which uses it to find that same
/// disk among several (see docs/boot.md). With `prefix` set, GRUB's normal
/// mode then runs `nimbus/grub.cfg` from the ESP ([`script`]).
pub fn embedded_config() -> String {
    "serial --unit=0 --speed=115200\n\
     terminal_input serial console\n\
     terminal_output serial console\n\
     set root=(hd0,gpt1)\n\
     probe --set=esp --part-uuid (hd0,gpt1)\n\
     set prefix=(hd0,gpt1)/nimbus\n"
        .to_string()
}

/// Where the script lives on the ESP (written by the build, never by
/// updates: they change `nimbus/grubenv` only).
pub const SCRIPT: &str = nimbus::esp::GRUB_SCRIPT;

/// The script: which stage-1 copy, from `nimbus/grubenv`
/// (nimbus::esp::Grubenv, whose `grub_boot` is this rule in Rust): the
/// default copy, or once, the copy on trial, with the try written back
/// before it starts (`save_env` rewrites the block in place). A trial
/// that is never blessed leaves `nimbus_s1_tries=0`, and the next boot
/// takes the default again.
pub fn script(cmdline: &str) -> String {
    format!(
        "set s1=a\n\
         load_env --file /{env} nimbus_s1 nimbus_s1_try nimbus_s1_tries\n\
         if [ -n \"$nimbus_s1\" ]; then set s1=$nimbus_s1; fi\n\
         if [ -n \"$nimbus_s1_try\" ]; then\n\
           if [ \"$nimbus_s1_tries\" = 1 ]; then\n\
             set nimbus_s1_tries=0\n\
             save_env --file /{env} nimbus_s1_tries\n\
             set s1=$nimbus_s1_try\n\
           fi\n\
         fi\n\
         echo Nimbus: BIOS boot, stage 1 copy $s1 from ESP PARTUUID $esp\n\
         linux /nimbus/$s1/vmlinuz {cmdline} nimbus.esp=PARTUUID=$esp nimbus.stage1=$s1\n\
         initrd /nimbus/$s1/stage1.img\n\
         boot\n",
        env = nimbus::esp::GRUBENV
    )
}

/// Run `grub-mkimage` for i386-pc with `config` embedded; `work` is scratch.
pub fn core_image(work: &Path, config: &str) -> Result<Vec<u8>, ImageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ImageError::Io { path: p, source }
    };
    let cfg = work.join("grub-embed.cfg");
    let out = work.join("grub-core.img");
    std::fs::write(&cfg, config).map_err(io(&cfg))?;
    run_tool(
        Command::new("grub-mkimage")
            .args([
                "-O",
                "i386-pc",
                "-d",
                GRUB_PC_DIR,
                "-p",
                "(hd0,gpt1)/grub",
                "-c",
            ])
            .arg(&cfg)
            .arg("-o")
            .arg(&out)
            .args(MODULES),
        "grub-mkimage (package grub-pc-bin)",
    )?;
    std::fs::read(&out).map_err(io(&out))
}

/// The MBR: GRUB's boot.img code around the disk's existing BPB area and
/// partition table, pointed at `core_lba`.
pub fn mbr(
    boot_img: &[u8],
    existing: &[u8; SECTOR],
    core_lba: u64,
) -> Result<[u8; SECTOR], ImageError> {
    if boot_img.len() != SECTOR || boot_img[0x1fe..] != [0x55, 0xaa] {
        return Err(ImageError::Invalid(format!(
            "{GRUB_PC_DIR}/boot.img is not a 512-byte boot sector"
        )));
    }
    let mut m = [0u8; SECTOR];
    m.copy_from_slice(boot_img);
    m[BPB].copy_from_slice(&existing[BPB]);
    m[PART_TABLE].copy_from_slice(&existing[PART_TABLE]);
    m[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    m[DRIVE_CHECK] = 0x90;
    m[DRIVE_CHECK + 1] = 0x90;
    Ok(m)
}

/// Point the core image's first block list entry at the sectors that
/// follow its first one, and check that it fits `room` bytes.
pub fn place_core(core: &mut [u8], core_lba: u64, room: u64) -> Result<(), ImageError> {
    if core.len() < SECTOR || core.len() as u64 > room {
        return Err(ImageError::Invalid(format!(
            "GRUB core image is {} bytes; BIOS-BOOT holds {room}",
            core.len()
        )));
    }
    let len = u16::from_le_bytes([core[BLOCKLIST_LEN], core[BLOCKLIST_LEN + 1]]) as usize;
    let sectors = core.len().div_ceil(SECTOR);
    if len + 1 != sectors {
        return Err(ImageError::Invalid(format!(
            "GRUB core image: block list says {len} sectors after the first, the image has {sectors} in all"
        )));
    }
    core[BLOCKLIST_START..BLOCKLIST_START + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    Ok(())
}

/// Install: core image at the start of BIOS-BOOT (`offset`, `size` bytes),
/// then the MBR. The image file already holds its protective MBR and GPT.
pub fn install(
    dev: &mut File,
    path: &Path,
    core: &[u8],
    offset: u64,
    size: u64,
) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let boot_img_path = Path::new(GRUB_PC_DIR).join("boot.img");
    let boot_img = std::fs::read(&boot_img_path).map_err(|source| ImageError::Io {
        path: boot_img_path.clone(),
        source,
    })?;
    let lba = offset / SECTOR as u64;
    let mut core = core.to_vec();
    place_core(&mut core, lba, size)?;
    let mut existing = [0u8; SECTOR];
    dev.seek(SeekFrom::Start(0)).map_err(io)?;
    dev.read_exact(&mut existing).map_err(io)?;
    let mbr = mbr(&boot_img, &existing, lba)?;
    dev.seek(SeekFrom::Start(offset)).map_err(io)?;
    dev.write_all(&core).map_err(io)?;
    dev.seek(SeekFrom::Start(0)).map_err(io)?;
    dev.write_all(&mbr).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_img() -> Vec<u8> {
        let mut b = vec![0xcc; SECTOR];
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b
    }

    #[test]
    fn mbr_keeps_partition_table_and_points_at_core() {
        let mut existing = [0u8; SECTOR];
        existing[0x1be..0x1ce].copy_from_slice(&[
            0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
        ]);
        existing[0x1b8..0x1bc].copy_from_slice(&[1, 2, 3, 4]);
        existing[0x10] = 7;
        let m = mbr(&boot_img(), &existing, 0x4000).unwrap();
        assert_eq!(&m[0x1b8..0x1fe], &existing[0x1b8..0x1fe]);
        assert_eq!(m[0x10], 7, "BPB area comes from the disk");
        assert_eq!(
            u64::from_le_bytes(m[0x5c..0x64].try_into().unwrap()),
            0x4000
        );
        assert_eq!(&m[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(&m[0x1fe..], &[0x55, 0xaa]);
        assert_eq!(m[0], 0xcc, "code comes from boot.img");
    }

    #[test]
    fn bad_boot_img_and_oversized_core_are_refused() {
        let existing = [0u8; SECTOR];
        assert!(mbr(&[0u8; 100], &existing, 1).is_err());
        assert!(mbr(&[0u8; SECTOR], &existing, 1).is_err(), "no 55aa");
        let mut core = vec![0u8; 4 * SECTOR];
        core[BLOCKLIST_LEN] = 3;
        assert!(place_core(&mut core.clone(), 100, 3 * SECTOR as u64).is_err());
        place_core(&mut core, 100, 4 * SECTOR as u64).unwrap();
        assert_eq!(
            u64::from_le_bytes(
                core[BLOCKLIST_START..BLOCKLIST_START + 8]
                    .try_into()
                    .unwrap()
            ),
            101
        );
        let mut wrong = vec![0u8; 4 * SECTOR];
        wrong[BLOCKLIST_LEN] = 9;
        assert!(
            place_core(&mut wrong, 100, 1 << 20).is_err(),
            "block list disagrees with size"
        );
    }
}
