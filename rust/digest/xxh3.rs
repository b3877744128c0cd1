//! xxh3, the hash behind every page hash, chunk hash, digest and checksum of the core, in one
//! place: the one-shot 64- and 128-bit hashes and the two streaming hashers.
//!
//! The code is twox-hash's, which picks its vector code (AVX2, else SSE2 on x86-64; NEON on
//! arm64) when it first runs, by asking the CPU. A crate that picks it when it is built runs SSE2
//! code on every machine a portable build reaches: over data in the cache, as a migration's
//! receiver and a restore hash what they just read, that is half the speed (docs/performance.md,
//! session 14). The values are XXH3's, whatever the code: they are in the checkpoint format and
//! on the wire, and tests pin them against the reference implementation.

use std::hash::Hasher as _;

use twox_hash::{XxHash3_128, XxHash3_64};

/// XXH3-64 of `bytes`, seed 0.
#[inline]
pub fn xxh3_64(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// XXH3-128 of `bytes`, seed 0.
#[inline]
pub fn xxh3_128(bytes: &[u8]) -> u128 {
    XxHash3_128::oneshot(bytes)
}

/// XXH3-128 over bytes fed in pieces: the same value as [`xxh3_128`] of them all at once.
pub struct Xxh3(XxHash3_128);

impl Xxh3 {
    pub fn new() -> Xxh3 {
        Xxh3(XxHash3_128::new())
    }

    #[inline]
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn digest128(&self) -> u128 {
        self.0.finish_128()
    }
}

impl Default for Xxh3 {
    fn default() -> Self {
        Xxh3::new()
    }
}

/// XXH3-64 over bytes fed in pieces: the same value as [`xxh3_64`] of them all at once.
pub struct Xxh3Short(XxHash3_64);

impl Xxh3Short {
    pub fn new() -> Xxh3Short {
        Xxh3Short(XxHash3_64::new())
    }

    #[inline]
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

impl Default for Xxh3Short {
    fn default() -> Self {
        Xxh3Short::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` bytes that look random: the hashes of the counting numbers, end to end.
    fn bytes(n: usize) -> Vec<u8> {
        (0..n.div_ceil(8) as u64).flat_map(|i| xxh3_64(&i.to_le_bytes()).to_le_bytes()).take(n).collect()
    }

    #[test]
    fn values_are_the_reference_implementations() {
        // From the reference xxHash (python-xxhash 4.1: xxh3_64_intdigest, xxh3_128_intdigest).
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxh3_128(b""), 0x99AA_06D3_0147_98D8_6001_C324_468D_497F);
        assert_eq!(xxh3_64(&[0u8; 4096]), 10653106456947493306);
        // Bytes (7 i) mod 251: one input under the 240-byte threshold and one over it.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(xxh3_64(&data[..200]), 15069069320842995130);
        assert_eq!(xxh3_128(&data[..200]), 0x5451_071e_d36a_d470_79ad_9081_5b45_bbd9);
        assert_eq!(xxh3_64(&data), 15126328255066576103);
        assert_eq!(xxh3_128(&data), 0x5ed3_5fc6_b4f0_ef20_d1eb_8367_bf32_94e7);
    }

    #[test]
    fn uneven_and_empty_pieces_give_the_one_shot_value() {
        let data = bytes(1 << 20);
        let (mut long, mut short) = (Xxh3::new(), Xxh3Short::new());
        let (mut at, mut piece) = (0, 0usize);
        while at < data.len() {
            // 0, 1, 64, 239, 240, 241, 4096, 70_000 bytes, over and over: empty updates between
            // and small ones after large ones.
            let len = [0, 1, 64, 239, 240, 241, 4096, 70_000][piece % 8].min(data.len() - at);
            long.update(&data[at..at + len]);
            short.update(&data[at..at + len]);
            (at, piece) = (at + len, piece + 1);
        }
        assert_eq!(long.digest128(), xxh3_128(&data));
        assert_eq!(short.digest(), xxh3_64(&data));
    }

    #[test]
    fn streaming_gives_the_one_shot_value_for_any_split() {
        let data = bytes(3 << 20);
        for len in [0, 1, 16, 17, 128, 129, 240, 241, 1000, 4096, 65_536, 1 << 20, (3 << 20) - 5] {
            for piece in [1usize, 63, 4096, 100_003] {
                if piece == 1 && len > 4096 {
                    continue;
                }
                let (mut long, mut short) = (Xxh3::new(), Xxh3Short::new());
                for p in data[5..5 + len].chunks(piece) {
                    long.update(p);
                    short.update(p);
                }
                assert_eq!(long.digest128(), xxh3_128(&data[5..5 + len]), "128, {len} bytes in pieces of {piece}");
                assert_eq!(short.digest(), xxh3_64(&data[5..5 + len]), "64, {len} bytes in pieces of {piece}");
            }
        }
    }
}
