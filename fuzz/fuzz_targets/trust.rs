//! A trust set and its rotation: the file as parsed on its own (built-in
//! sets) and as the next link of a chain, with the bytes split into the
//! set and its signature file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus::keys::{ReleaseKey, TrustStore};
use nimbus::trust::{advance, walk, Link, TrustDoc};

fuzz_target!(|data: &[u8]| {
    let _ = TrustDoc::parse(data);
    let key = ReleaseKey::from_secret([9u8; 32]);
    let mut current = TrustStore::new([key.public()], 1);
    current.version = 1;
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (bytes, sigs) = data.split_at(cut);
    if let Ok(next) = advance(&current, bytes, sigs) {
        // Whatever is accepted is exactly one version newer, and walks too.
        assert_eq!(next.version, 2);
        let (sets, _) = walk(
            current.clone(),
            &[Link {
                version: 2,
                bytes: bytes.to_vec(),
                sigs: sigs.to_vec(),
            }],
        );
        assert_eq!(sets.len(), 2);
    }
    // Signed by the trusted key: the parser and checks behind the
    // signature are reached for any bytes.
    let signed = serde_json::to_vec(&nimbus::release::Manifest::sign_bytes(data, &[&key]))
        .expect("signatures serialize");
    let _ = advance(&current, data, &signed);
});
