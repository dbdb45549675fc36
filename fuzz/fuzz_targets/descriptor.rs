//! The 4 KiB slot descriptor at the end of a USR partition.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus::keys::{ReleaseKey, TrustStore};
use nimbus::release::{SlotDescriptor, DESCRIPTOR_SIZE};

fuzz_target!(|data: &[u8]| {
    let key = ReleaseKey::from_secret([9u8; 32]);
    let trust = TrustStore::new([key.public()], 1);
    let _ = SlotDescriptor::parse_unverified(data);
    let _ = SlotDescriptor::verify(data, &trust);
    // Padded to the real size, so the field checks are reached too.
    let mut b = [0u8; DESCRIPTOR_SIZE];
    let n = data.len().min(DESCRIPTOR_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    if let Ok(d) = SlotDescriptor::parse_unverified(&b) {
        // Whatever parses must round-trip through signing.
        let signed = d.sign(&[&key]).expect("a parsed descriptor re-signs");
        let again = SlotDescriptor::verify(&signed, &trust).expect("and verifies");
        assert_eq!(again.version, d.version);
    }
});
