//! Trust sets in host mode against a real HTTP server on loopback: a key
//! added, used alone, and the old one removed through releases; what is
//! refused afterwards; a threshold of 2 of 3 keys; and the copy of the
//! rotations on the ESP that stage 1 reads (written only once the booted
//! slot is good and still valid under them).

mod support;

use std::path::Path;
use std::process::{Command, Output};

use nimbus::gpt::Disk;
use nimbus::keys::ReleaseKey;
use nimbus::layout::{Slot, ESP_PARTITION};
use nimbus::release::Manifest;
use nimbus::trust::TrustDoc;
use nimbus_image::release::{PublishOptions, Rotation};
use support::{build_signed, Fixture};

use support::{boot_rule as boot, mark_good};

/// The rotation versions on the ESP, read back with mtools.
fn esp_versions(disk: &Path) -> Vec<String> {
    let d = Disk::open_path(disk, false).expect("disk");
    let off = d.partition(ESP_PARTITION).expect("esp").offset_bytes();
    let out = Command::new("mdir")
        .args(["-b", "-i"])
        .arg(format!("{}@@{off}", disk.display()))
        .arg("::/nimbus/trust")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("mdir (mtools)");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|n| n.trim().to_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    v.sort();
    v
}

fn publish(
    f: &Fixture,
    from: &Path,
    keys: &[&ReleaseKey],
    rotation: Option<Rotation>,
) -> Result<Manifest, nimbus_image::ImageError> {
    nimbus_image::release::publish(&PublishOptions {
        from,
        repo: &f.repo,
        channel: "stable",
        keys,
        rotation,
        now: chrono::Utc::now(),
        expires_secs: 86400,
        rollout_secs: None,
        max_version: None,
        clear_max_version: false,
    })
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sign_file(path: &Path, keys: &[&ReleaseKey]) {
    let bytes = std::fs::read(path).expect("read");
    let sigs = Manifest::sign_bytes(&bytes, keys);
    std::fs::write(
        format!("{}.sig", path.display()),
        serde_json::to_vec(&sigs).expect("json"),
    )
    .expect("write sig");
}

#[test]
fn a_key_is_added_used_alone_then_the_old_one_is_refused() {
    // The fixture: the host runs 1.0.0 signed by key 1 (trust set 1 = {1});
    // 1.1.0, also signed by key 1, is on the channel.
    let f = Fixture::new(2, 32);
    support::format_esp(&f.disk);
    let k1 = &f.key;
    let k2 = ReleaseKey::from_secret([2; 32]);
    let w = f.tmp.path();

    // 1.1.0 is republished with a rotation that adds key 2 (signed by both).
    publish(
        &f,
        &f.next.dir,
        &[k1, &k2],
        Some(Rotation {
            add: vec![k2.public()],
            ..Rotation::default()
        }),
    )
    .expect("publish 1.1.0 with trust set 2");
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["new_version"], "1.1.0", "{st}");
    assert_eq!(st["trust"]["usr"]["version"], 2, "{st}");
    assert_eq!(st["trust"]["usr"]["keys"].as_array().map(Vec::len), Some(2));
    let chain = f.root.join(nimbus::paths::TRUST_CHAIN_ROOT);
    assert!(chain.join("2.json").is_file() && chain.join("2.json.sig").is_file());
    // USR-A is not proven in the fixture: nothing goes to the ESP yet.
    assert!(esp_versions(&f.disk).is_empty());

    // The host reboots into 1.1.0, which is marked good.
    assert_eq!(boot(&f), 4);
    mark_good(&f, 4);

    // 1.2.0 is signed by key 2 alone and removes key 1 (trust set 3).
    let trust2 = TrustDoc::parse(&std::fs::read(chain.join("2.json")).unwrap()).unwrap();
    let b3 = build_signed(w, "1.2.0", 2, f.usr_size, &[&k2], &trust2);
    publish(
        &f,
        &b3.dir,
        &[&k2],
        Some(Rotation {
            remove: vec![k1.id],
            ..Rotation::default()
        }),
    )
    .expect("publish 1.2.0 with trust set 3");
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.1.0", "{st}");
    assert_eq!(st["new_version"], "1.2.0", "{st}");
    assert_eq!(st["trust"]["usr"]["version"], 3, "{st}");
    // 1.1.0 (signed by key 1) runs: stage 1 must keep key 1 until a slot
    // signed by the new set is proven, so the ESP stops at set 2.
    assert_eq!(st["trust"]["active_version"], 2, "{st}");
    assert_eq!(st["trust"]["esp_version"], 2, "{st}");
    assert_eq!(esp_versions(&f.disk), vec!["2.json", "2.json.sig"]);

    assert_eq!(boot(&f), 3);
    mark_good(&f, 3);
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.2.0", "{st}");
    assert_eq!(st["trust"]["active_version"], 3, "{st}");
    assert_eq!(
        esp_versions(&f.disk),
        vec!["2.json", "2.json.sig", "3.json", "3.json.sig"]
    );

    // 1.3.0 signed by key 1 only: the release step refuses to publish it,
    // and a manifest signed by key 1 anyway is refused by the host.
    let trust3 = TrustDoc::parse(&std::fs::read(chain.join("3.json")).unwrap()).unwrap();
    let b4 = build_signed(w, "1.3.0", 2, f.usr_size, &[k1], &trust3);
    let e = publish(&f, &b4.dir, &[k1], None).unwrap_err();
    assert!(e.to_string().contains("not trusted"), "{e}");
    let mpath = f.repo.join("channels/stable.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m.serial += 1;
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    sign_file(&mpath, &[k1]);
    let b_before = f.partition_sha(Slot::B);
    let (out, st) = f.once(&[]);
    assert_eq!(out.status.code(), Some(4));
    let st = st.expect("status");
    assert_eq!(st["last_error"]["kind"], "untrusted-key", "{st}");
    assert_eq!(f.partition_sha(Slot::B), b_before);

    // A rotation signed by the removed key, and an older set replayed as
    // the next one: both refused, nothing stored.
    sign_file(&mpath, &[&k2]);
    let t4 = f.repo.join("trust/4.json");
    let mut doc = trust3.clone();
    doc.version = 4;
    doc.keys = TrustDoc::initial([k1.public()], 1).keys;
    std::fs::write(&t4, doc.to_bytes()).unwrap();
    sign_file(&t4, &[k1]);
    let (out, st) = f.once(&[]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        st.expect("status")["last_error"]["kind"],
        "trust-not-vouched"
    );
    std::fs::write(&t4, trust2.to_bytes()).unwrap();
    sign_file(&t4, &[&k2]);
    let (out, st) = f.once(&[]);
    assert_eq!(out.status.code(), Some(4));
    let st = st.expect("status");
    assert_eq!(st["last_error"]["kind"], "trust-older", "{st}");
    assert!(!chain.join("4.json").exists());
    assert_eq!(st["trust"]["usr"]["version"], 3);
}

#[test]
fn two_of_three_keys_must_sign() {
    let f = Fixture::new(2, 32);
    let w = f.tmp.path();
    let (k1, k2, k3) = (
        ReleaseKey::from_secret([11; 32]),
        ReleaseKey::from_secret([12; 32]),
        ReleaseKey::from_secret([13; 32]),
    );
    // The host's built-in set: 2 of {1, 2, 3}. Its running slot is signed
    // by two of them.
    let trust = TrustDoc::initial([k1.public(), k2.public(), k3.public()], 2);
    std::fs::write(f.root.join(nimbus::paths::TRUST_USR), trust.to_bytes()).unwrap();
    let cur = build_signed(w, "1.0.0", 2, f.usr_size, &[&k1, &k3], &trust);
    support::make_disk(&f.disk, f.usr_size, &cur.slot);
    // A repository of this key set's own.
    for d in ["channels", "payloads"] {
        std::fs::remove_dir_all(f.repo.join(d)).expect("clear repo");
    }

    // 1.1.0's manifest with one signature: refused before any download.
    let one = build_signed(w, "1.1.0", 2, f.usr_size, &[&k1, &k2], &trust);
    let e = publish(&f, &one.dir, &[&k1], None).unwrap_err();
    assert!(e.to_string().contains("1 valid signature"), "{e}");
    publish(&f, &one.dir, &[&k1, &k2], None).expect("publish");
    let mpath = f.repo.join("channels/stable.json");
    sign_file(&mpath, &[&k1]);
    f.httpd.clear_log();
    let (out, st) = f.once(&[]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        st.expect("status")["last_error"]["kind"],
        "signature-threshold"
    );
    assert!(!f
        .httpd
        .requests()
        .iter()
        .any(|r| r.path.ends_with("usr.img.zst")));
    // The same key twice is still one.
    sign_file(&mpath, &[&k1, &k1]);
    let (out, _) = f.once(&[]);
    assert_eq!(out.status.code(), Some(4));

    // Two signatures: it installs.
    sign_file(&mpath, &[&k2, &k3]);
    let (out, st) = f.once(&[]);
    ok(&out);
    assert_eq!(st.expect("status")["new_version"], "1.1.0");
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));

    // A slot whose descriptor carries one signature is written, then
    // refused, and never made bootable.
    let weak = build_signed(w, "1.2.0", 2, f.usr_size, &[&k3], &trust);
    assert_eq!(boot(&f), 4);
    mark_good(&f, 4);
    publish(&f, &weak.dir, &[&k1, &k2], None).expect("publish");
    let (out, st) = f.once(&[]);
    assert_eq!(out.status.code(), Some(4));
    let st = st.expect("status");
    assert_eq!(st["last_error"]["kind"], "slot-descriptor", "{st}");
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1 valid signature(s) from distinct trusted keys, 2 required"),
        "{st}"
    );
    let (prio, _, _) = f.cgpt(Slot::A);
    assert_eq!(prio, 0, "the refused slot stays unbootable");
}

#[test]
fn rotations_on_the_esp_count_when_root_lost_them() {
    use nimbus::esp::Esp;
    // ROOT was wiped (or never had them): the booted slot is signed by a
    // key only a rotation on the ESP makes trusted, as stage 1 saw it.
    let f = Fixture::new(2, 32);
    let k1 = &f.key;
    let k2 = ReleaseKey::from_secret([2; 32]);
    let mut v1 = nimbus::keys::TrustStore::new([k1.public()], 1);
    v1.version = 1;
    let d2 = nimbus::trust::rotate(&v1, &[k2.public()], &[], None).unwrap();
    let bytes = d2.to_bytes();
    let sigs = serde_json::to_vec(&Manifest::sign_bytes(&bytes, &[k1, &k2])).unwrap();
    let d = Disk::open_path(&f.disk, false).unwrap();
    let esp = nimbus_updater::esp::ImageEsp {
        image: f.disk.clone(),
        offset: d.partition(ESP_PARTITION).unwrap().offset_bytes(),
    };
    drop(d);
    let cur = support::build_signed(f.tmp.path(), "1.0.1", 2, f.usr_size, &[&k2], &d2);
    support::make_disk(&f.disk, f.usr_size, &cur.slot);
    support::format_esp(&f.disk);
    esp.with(true, &mut |fs| {
        nimbus::chain::write(
            fs,
            nimbus::esp::CHAIN_DIR,
            &[nimbus::trust::Link {
                version: 2,
                bytes: bytes.clone(),
                sigs: sigs.clone(),
            }],
        )
    })
    .unwrap();
    let (out, st) = f.once(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = st.expect("status");
    assert_eq!(st["running_version"], "1.0.1", "{st}");
    assert_eq!(st["trust"]["usr"]["version"], 2, "{st}");
    assert_eq!(st["trust"]["esp_version"], 2, "{st}");
}

#[test]
fn a_torn_signature_on_the_esp_is_written_again() {
    use nimbus::esp::Esp;
    // A power cut tore the ESP's copy of rotation 2's signatures (FAT has
    // no journal); ROOT holds the whole link. Stage 1 would stop its chain
    // at the torn link, so update-engine writes it again once the booted
    // slot is good.
    let f = Fixture::new(2, 32);
    let k1 = &f.key;
    let k2 = ReleaseKey::from_secret([2; 32]);
    let mut v1 = nimbus::keys::TrustStore::new([k1.public()], 1);
    v1.version = 1;
    let d2 = nimbus::trust::rotate(&v1, &[k2.public()], &[], None).unwrap();
    let link = nimbus::trust::Link {
        version: 2,
        bytes: d2.to_bytes(),
        sigs: serde_json::to_vec(&Manifest::sign_bytes(&d2.to_bytes(), &[k1, &k2])).unwrap(),
    };
    let d = Disk::open_path(&f.disk, false).unwrap();
    let esp = nimbus_updater::esp::ImageEsp {
        image: f.disk.clone(),
        offset: d.partition(ESP_PARTITION).unwrap().offset_bytes(),
    };
    drop(d);
    let cur = support::build_signed(f.tmp.path(), "1.0.1", 2, f.usr_size, &[&k2], &d2);
    support::make_disk(&f.disk, f.usr_size, &cur.slot);
    support::format_esp(&f.disk);
    nimbus::chain::write(
        &nimbus::esp::DirEsp(f.root.clone()),
        nimbus::paths::TRUST_CHAIN_ROOT,
        std::slice::from_ref(&link),
    )
    .unwrap();
    let torn = nimbus::trust::Link {
        sigs: link.sigs[..link.sigs.len() / 2].to_vec(),
        ..link.clone()
    };
    esp.with(true, &mut |fs| {
        nimbus::chain::write(fs, nimbus::esp::CHAIN_DIR, std::slice::from_ref(&torn))
    })
    .unwrap();
    mark_good(&f, boot(&f));
    let (out, st) = f.once(&[]);
    ok(&out);
    let st = st.expect("status");
    assert_eq!(st["trust"]["usr"]["version"], 2, "{st}");
    assert_eq!(st["trust"]["esp_version"], 2, "{st}");
    let mut back = Vec::new();
    esp.with(false, &mut |fs| {
        back = nimbus::chain::read(fs, nimbus::esp::CHAIN_DIR)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].sigs, link.sigs, "the torn signatures stayed");
    assert_eq!(back[0].bytes, link.bytes);
}
