//! Streaming chunk hashes: feed the image in order as data slices and zero runs, get one
//! xxh3-128 per chunk. Zero runs cost nothing until a chunk holds data: a chunk that is all zero
//! gets the (cached) hash of a zero chunk without hashing a byte.

use std::collections::HashMap;

use crate::digest::xxh3::Xxh3;

/// Zeros fed to the hasher for the zero runs inside a chunk that also holds data.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

pub struct ChunkHasher {
    chunk_size: usize,
    /// Bytes of the current chunk seen so far.
    filled: usize,
    /// Zero bytes owed to the current chunk's hasher, which does not exist until data arrives.
    zeros_owed: usize,
    hasher: Option<Xxh3>,
    hashes: Vec<u128>,
    zero_chunk: HashMap<usize, u128>,
}

impl ChunkHasher {
    /// `chunk_size` must be positive (the callers check it is a multiple of the page size).
    pub fn new(chunk_size: usize, total: u64) -> ChunkHasher {
        assert!(chunk_size > 0);
        ChunkHasher {
            chunk_size,
            filled: 0,
            zeros_owed: 0,
            hasher: None,
            hashes: Vec::with_capacity(total.div_ceil(chunk_size as u64) as usize),
            zero_chunk: HashMap::new(),
        }
    }

    /// The hash of `len` zero bytes (a chunk that is all hole).
    pub fn zero_hash(len: usize) -> u128 {
        let mut h = Xxh3::new();
        feed_zeros(&mut h, len);
        h.digest128()
    }

    fn close_chunk(&mut self) {
        let len = self.filled;
        let hash = match self.hasher.take() {
            Some(mut h) => {
                feed_zeros(&mut h, self.zeros_owed);
                h.digest128()
            }
            None => *self.zero_chunk.entry(len).or_insert_with(|| Self::zero_hash(len)),
        };
        self.hashes.push(hash);
        self.filled = 0;
        self.zeros_owed = 0;
    }

    /// `n` zero bytes of the image.
    pub fn zeros(&mut self, mut n: u64) {
        while n > 0 {
            let room = self.chunk_size - self.filled;
            let take = (room as u64).min(n) as usize;
            if let Some(hasher) = &mut self.hasher {
                feed_zeros(hasher, take);
            } else {
                self.zeros_owed += take;
            }
            self.filled += take;
            n -= take as u64;
            if self.filled == self.chunk_size {
                self.close_chunk();
            }
        }
    }

    /// The next bytes of the image.
    pub fn data(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.chunk_size - self.filled;
            let take = room.min(bytes.len());
            let owed = std::mem::take(&mut self.zeros_owed);
            let hasher = self.hasher.get_or_insert_with(Xxh3::new);
            feed_zeros(hasher, owed);
            hasher.update(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == self.chunk_size {
                self.close_chunk();
            }
        }
    }

    /// The hashes of every chunk, the last one short if the image ends inside it.
    pub fn finish(mut self) -> Vec<u128> {
        if self.filled > 0 {
            self.close_chunk();
        }
        self.hashes
    }
}

fn feed_zeros(hasher: &mut Xxh3, mut n: usize) {
    while n > 0 {
        let take = n.min(ZEROS.len());
        hasher.update(&ZEROS[..take]);
        n -= take;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::xxh3::xxh3_128;

    #[test]
    fn streamed_hashes_equal_one_shot_hashes_of_each_chunk() {
        let mut image = vec![0u8; 10 * 4096 + 4096];
        image[5000] = 1;
        image[3 * 4096 * 2 + 17] = 2; // inside chunk 3 (8 KiB chunks)
        let mut h = ChunkHasher::new(8192, image.len() as u64);
        // Feed as zeros where the image is zero in 4 KiB pieces, data elsewhere.
        for page in image.chunks(4096) {
            if page.iter().all(|&b| b == 0) {
                h.zeros(4096);
            } else {
                h.data(page);
            }
        }
        let expected: Vec<u128> = image.chunks(8192).map(xxh3_128).collect();
        assert_eq!(h.finish(), expected);
    }

    #[test]
    fn runs_may_cross_chunk_boundaries_in_any_size() {
        let image: Vec<u8> = (0..100_000u32).map(|i| if i % 7000 < 3000 { 0 } else { i as u8 | 1 }).collect();
        let mut h = ChunkHasher::new(4096, image.len() as u64);
        let mut i = 0;
        while i < image.len() {
            let zero = image[i] == 0;
            let mut j = i;
            while j < image.len() && (image[j] == 0) == zero {
                j += 1;
            }
            if zero {
                h.zeros((j - i) as u64);
            } else {
                h.data(&image[i..j]);
            }
            i = j;
        }
        let expected: Vec<u128> = image.chunks(4096).map(xxh3_128).collect();
        assert_eq!(h.finish(), expected);
    }
}
