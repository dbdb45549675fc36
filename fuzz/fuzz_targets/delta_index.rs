//! The delta index as a host reads it (after its sha256 matched the
//! manifest, which a hostile publisher controls): every input is an error
//! or an index whose geometry is consistent, so the planner and the fetch
//! thread never index out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus::delta::{frames_for, Index};

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = Index::parse(data) {
        let blocks = ix.data_blocks();
        assert_eq!(ix.frames(), frames_for(blocks));
        assert_eq!(ix.to_bytes(), data, "parse and to_bytes disagree");
        for f in 0..ix.frames() {
            let (s, e) = ix.frame_bytes(f);
            assert!(s < e && e <= ix.pack_size());
            let (b0, b1) = ix.frame_blocks(f);
            assert!(b0 < b1 && b1 <= blocks);
            assert_eq!(Index::frame_of(b0), f);
        }
    }
});
