//! Channel manifest + detached signatures: the bytes a hostile server sends.
//! The input is split at the first 0xff: manifest bytes, then the signature
//! file. Signed by a fixed key so the fuzzer can also reach the parser
//! behind a valid signature (it finds none, but the structure checks after
//! `serde_json` are exercised through `Manifest::validate` directly).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus::keys::{ReleaseKey, TrustStore};
use nimbus::release::{verify_detached, Manifest, ManifestPolicy};

fuzz_target!(|data: &[u8]| {
    let key = ReleaseKey::from_secret([7u8; 32]);
    let trust = TrustStore::new([key.public()], 1);
    let (m, s) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"[]"[..]),
    };
    let policy = ManifestPolicy {
        channel: "stable",
        now: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
        last_serial: Some(3),
    };
    let _ = Manifest::verify(m, s, &trust, &policy);
    let _ = verify_detached(m, s, &trust);
    // The same bytes as if they had been signed: the checks after the signature.
    let sigs = serde_json_bytes(&Manifest::sign_bytes(m, &[&key]));
    if let Ok(man) = Manifest::verify(m, &sigs, &trust, &policy) {
        // What the engine does next with a verified manifest: choose, with
        // rollouts, at several host positions and times (a huge rollout
        // once panicked chrono here).
        let running: semver::Version = "1.0.0".parse().expect("version");
        for seed in [0.0, 0.5, 0.999_999] {
            for now in [policy.now, chrono::DateTime::<chrono::Utc>::MAX_UTC] {
                let _ = nimbus_updater::choose::choose(&man, &running, seed, now, false);
                let _ = nimbus_updater::choose::choose(&man, &running, seed, now, true);
            }
        }
        for r in &man.releases {
            let _ = nimbus_updater::choose::rollout_start(r, 0.7);
        }
    }
});

fn serde_json_bytes(sigs: &[nimbus::release::SignatureEntry]) -> Vec<u8> {
    let mut out = b"[".to_vec();
    for (i, s) in sigs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"keyid\":\"{}\",\"sig\":\"{}\"}}", s.keyid, s.sig).as_bytes());
    }
    out.push(b']');
    out
}
