//! The GPT reader on a hostile disk. The input is the primary header and
//! entry array of a 64 MiB disk; signature, locations and both CRCs are
//! fixed up (half of the time) so the fuzzer gets past the checksums into
//! the entries, the layout check and a write-back; the backup copy is a
//! mirror or, for odd first bytes, left empty.
#![no_main]

use std::io::{Seek, SeekFrom, Write};

use libfuzzer_sys::fuzz_target;
use nimbus::gpt::{Disk, MemDisk};

const LEN: u64 = 64 << 20;
const LAST_LBA: u64 = LEN / 512 - 1;

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut header = [0u8; 512];
    let mut entries = vec![0u8; 32 * 512];
    let n = rest.len().min(92);
    header[..n].copy_from_slice(&rest[..n]);
    if rest.len() > 92 {
        let m = (rest.len() - 92).min(entries.len());
        entries[..m].copy_from_slice(&rest[92..92 + m]);
    }
    if mode & 2 == 0 {
        header[0..8].copy_from_slice(b"EFI PART");
        put_u32(&mut header, 8, 0x0001_0000);
        put_u32(&mut header, 12, 92);
        put_u64(&mut header, 24, 1);
        put_u64(&mut header, 32, LAST_LBA);
        put_u64(&mut header, 72, 2);
        put_u32(&mut header, 80, 128);
        put_u32(&mut header, 84, 128);
        put_u32(&mut header, 88, crc32fast::hash(&entries));
        put_u32(&mut header, 16, 0);
        let crc = crc32fast::hash(&header[..92]);
        put_u32(&mut header, 16, crc);
    }
    let mut dev = MemDisk::new(LEN);
    let _ = dev.seek(SeekFrom::Start(512)).and_then(|_| dev.write_all(&header));
    let _ = dev.write_all(&entries);
    if mode & 1 == 0 {
        let mut backup = header;
        put_u64(&mut backup, 24, LAST_LBA);
        put_u64(&mut backup, 32, 1);
        put_u64(&mut backup, 72, LAST_LBA - 32);
        put_u32(&mut backup, 16, 0);
        let crc = crc32fast::hash(&backup[..92]);
        put_u32(&mut backup, 16, crc);
        let _ = dev.seek(SeekFrom::Start((LAST_LBA - 32) * 512)).and_then(|_| dev.write_all(&entries));
        let _ = dev.seek(SeekFrom::Start(LAST_LBA * 512)).and_then(|_| dev.write_all(&backup));
    }
    if let Ok(mut d) = Disk::open(dev, "fuzz") {
        let _ = d.check_nimbus_layout();
        let _ = d.slot_table();
        for p in d.partitions() {
            let _ = (p.offset_bytes(), p.size_bytes(), p.prio());
        }
        for n in [1, 2, 3, 4, 6, 9, 128] {
            let _ = d.partition(n).map(|p| p.size_bytes());
        }
        for s in nimbus::layout::Slot::ALL {
            let _ = d.read_descriptor(s);
        }
        // First boot on whatever was read: GUIDs, a moved backup, ROOT grown.
        let mut n = 0u128;
        let _ = d.prepare_host(|| {
            n += 1;
            uuid::Uuid::from_u128(n)
        });
        // A write on whatever was read must not panic either.
        let _ = d.update_slots(|t| {
            let _ = nimbus::slots::select_for_boot(t, &[]);
            Ok(())
        });
    }
});
