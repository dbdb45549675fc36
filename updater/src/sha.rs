//! SHA-256 whose running state can be saved and restored, so an interrupted
//! download resumes without re-hashing bytes that are no longer at hand (the
//! compressed prefix). The compression function is sha2's (SHA-NI when the
//! CPU has it); only the Merkle-Damgard bookkeeping lives here.

use sha2::digest::generic_array::GenericArray;

const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    buf: [u8; 64],
    buf_len: usize,
    len: u64,
}

/// A saved hash state, as stored in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub state: [u32; 8],
    /// The bytes of the unfinished block, hex.
    pub tail: String,
    pub len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            state: IV,
            buf: [0; 64],
            buf_len: 0,
            len: 0,
        }
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buf_len > 0 {
            let n = (64 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + n].copy_from_slice(&data[..n]);
            self.buf_len += n;
            data = &data[n..];
            if self.buf_len < 64 {
                return;
            }
            sha2::compress256(
                &mut self.state,
                &[GenericArray::clone_from_slice(&self.buf)],
            );
            self.buf_len = 0;
        }
        let whole = data.len() / 64 * 64;
        if whole > 0 {
            // Safe reinterpretation would need unsafe; chunking by 64 and
            // collecting into a small stack batch keeps SHA-NI fed.
            let mut batch: [GenericArray<u8, sha2::digest::consts::U64>; 16] = Default::default();
            for group in data[..whole].chunks(64 * 16) {
                let k = group.len() / 64;
                for (i, b) in group.chunks_exact(64).enumerate() {
                    batch[i].copy_from_slice(b);
                }
                sha2::compress256(&mut self.state, &batch[..k]);
            }
        }
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    pub fn finalize_hex(&self) -> String {
        let mut s = self.clone();
        let bits = s.len.wrapping_mul(8);
        let mut pad = vec![0x80u8];
        let rem = (s.len % 64) as usize;
        let zeros = if rem < 56 { 55 - rem } else { 119 - rem };
        pad.extend(std::iter::repeat_n(0u8, zeros));
        pad.extend_from_slice(&bits.to_be_bytes());
        s.update(&pad);
        debug_assert_eq!(s.buf_len, 0);
        let mut out = [0u8; 32];
        for (i, w) in s.state.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        hex::encode(out)
    }

    pub fn save(&self) -> SavedState {
        SavedState {
            state: self.state,
            tail: hex::encode(&self.buf[..self.buf_len]),
            len: self.len,
        }
    }

    /// `None` when the saved state is inconsistent (a damaged checkpoint).
    pub fn restore(s: &SavedState) -> Option<Sha256> {
        let tail = hex::decode(&s.tail).ok()?;
        if tail.len() >= 64 || tail.len() as u64 != s.len % 64 {
            return None;
        }
        let mut buf = [0u8; 64];
        buf[..tail.len()].copy_from_slice(&tail);
        Some(Sha256 {
            state: s.state,
            buf,
            buf_len: tail.len(),
            len: s.len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn matches_sha2_for_every_split() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in [
            0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1023, 1024, 1025, 5000,
        ] {
            let want = hex::encode(sha2::Sha256::digest(&data[..len]));
            for split in [0, 1, 3, 63, 64, 100, len / 2, len] {
                let split = split.min(len);
                let mut h = Sha256::new();
                h.update(&data[..split]);
                let h = Sha256::restore(&h.save()).expect("restore");
                let mut h = h;
                h.update(&data[split..len]);
                assert_eq!(h.finalize_hex(), want, "len {len} split {split}");
            }
        }
    }

    #[test]
    fn damaged_state_is_refused() {
        let mut h = Sha256::new();
        h.update(b"abc");
        let mut s = h.save();
        s.len = 4;
        assert!(Sha256::restore(&s).is_none());
        s.len = 3;
        s.tail = "zz".into();
        assert!(Sha256::restore(&s).is_none());
    }
}
