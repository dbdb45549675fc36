//! Stage 1 updates itself, in host mode against loopback HTTP and a real
//! FAT ESP (read and written with mtools): the release's stage 1 goes into
//! the ESP's other copy with one try for each loader; a trial the loader
//! gives up is reported, cleared and not installed again; a stage 1 that
//! does not match the signed manifest is refused before the ESP changes.

mod support;

use nimbus::esp::{Copy, Esp, Grubenv};
use nimbus::gpt::Disk;
use nimbus::layout::{Slot, ESP_PARTITION};
use nimbus_updater::esp::ImageEsp;
use support::Fixture;

fn esp(f: &Fixture) -> ImageEsp {
    let d = Disk::open_path(&f.disk, false).expect("disk");
    ImageEsp {
        image: f.disk.clone(),
        offset: d.partition(ESP_PARTITION).expect("esp").offset_bytes(),
    }
}

/// The ESP as build-image leaves it: copy a, its entry, GRUB's environment.
fn seed_esp(f: &Fixture) {
    support::format_esp(&f.disk);
    esp(f)
        .with(true, &mut |fs| {
            for (p, b) in nimbus::esp::initial_files("1.0.0", "console=ttyS0")? {
                fs.replace(&p, &b)?;
            }
            fs.replace(&Copy::A.kernel(), b"kernel of 1.0.0")?;
            fs.replace(&Copy::A.initramfs(), b"stage 1 of 1.0.0")?;
            Ok(())
        })
        .expect("seed ESP");
}

fn read(f: &Fixture, rel: &str) -> Option<Vec<u8>> {
    let mut out = None;
    esp(f)
        .with(false, &mut |fs| {
            out = fs.read(rel, 1 << 20)?;
            Ok(())
        })
        .expect("read ESP");
    out
}

fn entries(f: &Fixture) -> Vec<String> {
    let mut out = Vec::new();
    esp(f)
        .with(false, &mut |fs| {
            out = nimbus::esp::entries(fs)?
                .into_iter()
                .map(|e| e.file)
                .collect();
            Ok(())
        })
        .expect("entries");
    out
}

/// Give the next release (1.1.0) a stage 1 and publish it again.
fn with_stage1(f: &Fixture, kernel: &[u8], initramfs: &[u8]) {
    let dir = f.next.dir.join("stage1");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("vmlinuz"), kernel).expect("write");
    std::fs::write(dir.join("stage1.img"), initramfs).expect("write");
    // 1.1.0 is on the channel already, without stage 1: start the
    // repository over (a published release is immutable).
    for d in ["channels", "payloads"] {
        std::fs::remove_dir_all(f.repo.join(d)).expect("clear");
    }
    support::publish(&f.repo, &f.next.dir, "stable", &f.key, 86400);
}

#[test]
fn a_new_stage1_goes_into_the_other_copy_and_a_failed_trial_is_reported() {
    let f = Fixture::new(2, 32);
    seed_esp(&f);
    with_stage1(&f, b"kernel of 1.1.0", b"stage 1 of 1.1.0");

    let (out, st) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = st.expect("status");
    assert_eq!(st["new_version"], "1.1.0", "{st}");
    assert_eq!(st["stage1"]["pending"]["copy"], "b", "{st}");
    assert_eq!(st["stage1"]["pending"]["generation"], 2, "{st}");
    // Copy b holds the release's files, copy a is untouched, each loader
    // has one try of b.
    assert_eq!(
        read(&f, "nimbus/b/vmlinuz").as_deref(),
        Some(&b"kernel of 1.1.0"[..])
    );
    assert_eq!(
        read(&f, "nimbus/b/stage1.img").as_deref(),
        Some(&b"stage 1 of 1.1.0"[..])
    );
    assert_eq!(
        read(&f, "nimbus/a/vmlinuz").as_deref(),
        Some(&b"kernel of 1.0.0"[..])
    );
    assert_eq!(entries(&f), vec!["nimbus-1-a.conf", "nimbus-2-b+1.conf"]);
    let env = Grubenv::parse(&read(&f, nimbus::esp::GRUBENV).expect("grubenv")).expect("env");
    assert_eq!(
        (env.default_copy(), env.trial(), env.tries()),
        (Copy::A, Some(Copy::B), 1)
    );
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));

    // GRUB starts copy b once (spending the try); it never comes up; the
    // machine resets and GRUB starts copy a.
    esp(&f)
        .with(true, &mut |fs| {
            for _ in 0..2 {
                let (_, next) = nimbus::esp::grubenv(fs)?.grub_boot();
                fs.replace(nimbus::esp::GRUBENV, &next.to_bytes()?)?;
            }
            Ok(())
        })
        .expect("boot");
    let (out, st) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = st.expect("status");
    let failed = &st["stage1"]["failed"];
    assert_eq!(failed["install"]["version"], "1.1.0", "{st}");
    assert_eq!(failed["blocked"], true, "{st}");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or("")
            .contains("never came up"),
        "{st}"
    );
    // The trial is gone from both loaders; copy a is the choice of both.
    assert_eq!(entries(&f), vec!["nimbus-1-a.conf"]);
    let env = Grubenv::parse(&read(&f, nimbus::esp::GRUBENV).expect("grubenv")).expect("env");
    assert_eq!((env.default_copy(), env.trial()), (Copy::A, None));
}

#[test]
fn a_stage1_that_does_not_match_the_manifest_is_refused_before_the_esp_changes() {
    let f = Fixture::new(2, 32);
    seed_esp(&f);
    with_stage1(&f, b"kernel of 1.1.0", b"stage 1 of 1.1.0");
    // The mirror serves other bytes than were signed.
    std::fs::write(
        f.repo.join("payloads/1.1.0/stage1/stage1.img"),
        b"stage 1 of 6.6.6",
    )
    .expect("tamper");
    let b_before = f.partition_sha(Slot::B);
    let (out, st) = f.once(&[]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = st.expect("status");
    assert_eq!(st["last_error"]["kind"], "compressed-hash-mismatch", "{st}");
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("stage1/stage1.img"),
        "{st}"
    );
    assert_eq!(entries(&f), vec!["nimbus-1-a.conf"]);
    assert_eq!(read(&f, "nimbus/b/vmlinuz"), None);
    // The slot was written but never made bootable.
    assert_ne!(f.partition_sha(Slot::B), b_before);
    assert_eq!(f.cgpt(Slot::B).0, 0);
}
