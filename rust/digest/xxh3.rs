//! xxh3, the hash behind every page hash, chunk hash, digest and checksum of the core, in one
//! place: the one-shot 64- and 128-bit hashes and the two streaming hashers.
//!
//! The code is twox-hash's, which picks its vector code (AVX2, else SSE2 on x86-64; NEON on
//! arm64) when it first runs, by asking the CPU. A crate that picks it when it is built runs SSE2
//! code on every machine a portable build reaches: over data in the cache, as a migration's
//! receiver and a restore hash what they just read, that is half the speed (docs/performance.md,
//! session 14). The values are XXH3's, whatever the code: they are in the checkpoint format and
//! on the wire, and tests pin them against the reference implementation.
//!
//! One hash is ours: [`xxh3_64_page`], XXH3-64 of exactly one page, the page hash of the commit
//! digest on both ends of every migration. Where the CPU has AVX-512 it runs XXH3's steps on one
//! 512-bit register, at 1.56 x twox-hash's AVX2 code over pages in the cache on an Intel Xeon
//! (`cargo bench --bench memory -- page_hash_1MiB`). [`xxh3_64_page_streamed`] also copies the
//! page into guest memory in the same pass, for a receiver: on AVX-512, or where the CPU has only
//! AVX2 on two 256-bit registers (1.10-1.16 x the hash and then the copy on an AMD EPYC). Its
//! values are twox-hash's, checked page by page in the tests.

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

/// XXH3-64 (seed 0) of one 4 KiB page at `page`: the value [`xxh3_64`] gives for those 4096
/// bytes, computed with AVX-512 where the CPU has it (asked once, at the first call), else by
/// twox-hash.
///
/// Every page hash of the commit digest is one of these, on both ends of a migration. Over a page
/// in the cache, AVX-512 takes a 64-byte stripe per step where twox-hash's AVX2 code takes two
/// halves (docs/performance.md, session 28). Our AVX2 code is no faster than twox-hash's at the
/// hash alone (34.5-35.0 against 34.5-38.2 GiB/s in the cache on the AMD EPYC, session 31), so
/// it is used only where it also copies ([`xxh3_64_page_streamed`]).
///
/// # Safety
/// `page` must point at 4096 readable bytes.
#[inline]
pub unsafe fn xxh3_64_page(page: *const u8) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if page_simd::isa() == page_simd::Isa::Avx512 {
        // SAFETY: the caller's contract; the CPU has AVX-512F (asked by `isa`).
        return unsafe { page_simd::hash_avx512(page, None) };
    }
    // SAFETY: the caller's contract.
    unsafe { page_portable(page) }
}

/// [`xxh3_64_page`] without AVX-512: twox-hash's code.
///
/// # Safety
/// As [`xxh3_64_page`].
unsafe fn page_portable(page: *const u8) -> u64 {
    // SAFETY: the caller's contract.
    xxh3_64(unsafe { std::slice::from_raw_parts(page, PAGE_BYTES) })
}

/// [`xxh3_64_page`] of the page at `src`, which is also copied to `dst` with stores that bypass
/// the cache: one pass over the page for both, where the CPU has AVX-512 or AVX2 (else the hash,
/// then [`crate::memory::stream_page`]). The caller fences ([`crate::memory::stream_fence`]) before
/// anyone else reads `dst`.
///
/// # Safety
/// `src` must point at 4096 readable bytes and `dst` at 4096 writable ones, both 64-byte aligned,
/// not overlapping.
#[inline]
pub unsafe fn xxh3_64_page_streamed(dst: *mut u8, src: *const u8) -> u64 {
    debug_assert!((dst as usize).is_multiple_of(64), "xxh3_64_page_streamed: dst must be 64-byte aligned");
    #[cfg(target_arch = "x86_64")]
    match page_simd::isa() {
        // SAFETY: the caller's contract; the CPU has the instructions (asked by `isa`).
        page_simd::Isa::Avx512 => return unsafe { page_simd::hash_avx512(src, Some(dst)) },
        // SAFETY: as above.
        page_simd::Isa::Avx2 => return unsafe { page_simd::hash_avx2(src, Some(dst)) },
        page_simd::Isa::None => {}
    }
    // SAFETY: the caller's contract.
    unsafe { page_streamed_portable(dst, src) }
}

/// [`xxh3_64_page_streamed`] without AVX-512 or AVX2: the hash, then the copy.
///
/// # Safety
/// As [`xxh3_64_page_streamed`].
unsafe fn page_streamed_portable(dst: *mut u8, src: *const u8) -> u64 {
    // SAFETY: the caller's contract (stream_page needs 16-byte alignment, which 64 gives).
    unsafe {
        let h = page_portable(src);
        crate::memory::stream_page(dst, src);
        h
    }
}

const PAGE_BYTES: usize = 4096;

/// XXH3's long-input hash (more than 240 bytes, seed 0, the default secret) for exactly one page,
/// with the eight 64-bit accumulators in one AVX-512 register or two AVX2 ones. The steps and
/// constants are the XXH3 specification's; the values are checked against twox-hash's in the
/// tests below.
#[cfg(target_arch = "x86_64")]
mod page_simd {
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::PAGE_BYTES;

    /// XXH3's default secret (kSecret), 192 bytes.
    static SECRET: [u8; 192] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, //
        0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, //
        0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21, //
        0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c, //
        0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, //
        0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, //
        0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, //
        0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, //
        0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, //
        0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, //
        0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, //
        0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e, //
    ];
    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME32_2: u64 = 0x85EB_CA77;
    const PRIME32_3: u64 = 0xC2B2_AE3D;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;
    const PRIME_MX1: u64 = 0x1656_6791_9E37_79F9;
    /// The accumulators' starting values.
    static INIT: [u64; 8] = [PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1];
    /// Stripes of 64 bytes per block: (secret length - 64) / 8.
    const STRIPES_PER_BLOCK: usize = 16;
    const BLOCK: usize = STRIPES_PER_BLOCK * 64;
    /// Whole blocks before the last, partial one: (4096 - 1) / 1024.
    const BLOCKS: usize = (PAGE_BYTES - 1) / BLOCK;
    /// Stripes of the last block, before the final stripe: ((4096 - 1) - 3 * 1024) / 64.
    const LAST_STRIPES: usize = (PAGE_BYTES - 1 - BLOCKS * BLOCK) / 64;
    /// Where the scramble's key starts in the secret: its last 64 bytes.
    const SCRAMBLE_KEY: usize = 192 - 64;

    /// The vector instructions the page hash runs on here.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Isa {
        None,
        Avx2,
        Avx512,
    }

    /// 0 not asked yet, else 1 + the `Isa`'s position.
    static ISA: AtomicU8 = AtomicU8::new(0);

    /// The widest vectors this CPU has for the page hash (asked once).
    #[inline]
    pub(super) fn isa() -> Isa {
        const ALL: [Isa; 3] = [Isa::None, Isa::Avx2, Isa::Avx512];
        match ISA.load(Ordering::Relaxed) {
            0 => {
                let isa = if std::arch::is_x86_feature_detected!("avx512f") {
                    Isa::Avx512
                } else if std::arch::is_x86_feature_detected!("avx2") {
                    Isa::Avx2
                } else {
                    Isa::None
                };
                ISA.store(1 + ALL.iter().position(|&i| i == isa).unwrap() as u8, Ordering::Relaxed);
                isa
            }
            v => ALL[v as usize - 1],
        }
    }

    /// One step of XXH3's walk over a page.
    enum Step {
        /// Accumulate the 64-byte stripe at `at` in the page, keyed by the secret from `key`.
        Stripe { at: usize, key: usize },
        /// A whole block ends: fold its summed input into the neighbouring lanes and scramble.
        BlockEnd,
    }

    /// XXH3's stripes over one page in order, each whole block followed by its end; the last
    /// block (partial, not scrambled) ends with the page's final 64 bytes, keyed with the secret
    /// 7 bytes short of its end. The stripes before end 64 bytes early, so no byte is walked
    /// twice (a copy made stripe by stripe stores each byte once). Inlined into each vector
    /// width's hash, whose `step` closure inherits that function's instructions.
    #[inline(always)]
    fn walk(mut step: impl FnMut(Step)) {
        for b in 0..BLOCKS {
            for s in 0..STRIPES_PER_BLOCK {
                step(Step::Stripe { at: b * BLOCK + s * 64, key: s * 8 });
            }
            step(Step::BlockEnd);
        }
        for s in 0..LAST_STRIPES {
            step(Step::Stripe { at: BLOCKS * BLOCK + s * 64, key: s * 8 });
        }
        step(Step::Stripe { at: PAGE_BYTES - 64, key: SECRET.len() - 64 - 7 });
    }

    // Each stripe's accumulate is split in two sums: `acc` plus each lane's key-mixed 32x32
    // product, and `data` plus the stripe's lanes. The spec adds each lane's input to its
    // neighbour's accumulator; as the adds wrap (a sum is the same in any order), that is done
    // for a block's summed lanes at once, a shuffle per block instead of one per stripe: 5
    // operations a stripe (or half-stripe with AVX2), not 6. With a `dst`, each stripe is also
    // stored there, past the cache.

    /// XXH3-64 of the page at `src` on one AVX-512 register, storing it to `dst` as it goes when
    /// given.
    ///
    /// # Safety
    /// The CPU has AVX-512F ([`isa`]); `src` points at 4096 readable bytes; `dst`, when given, at
    /// 4096 writable 64-byte aligned ones that do not overlap them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn hash_avx512(src: *const u8, dst: Option<*mut u8>) -> u64 {
        let secret = SECRET.as_ptr();
        // SAFETY: the caller's contract: 4096 bytes at `src` (and `dst`); every offset `walk`
        // gives stays inside the page and inside the 192-byte secret.
        let lanes: [u64; 8] = unsafe {
            let mut acc = _mm512_loadu_si512(INIT.as_ptr() as *const __m512i);
            let mut data = _mm512_setzero_si512();
            // Lanes 0 and 1 swap, 2 and 3, ...
            let neighbours = |acc, data| _mm512_add_epi64(acc, _mm512_shuffle_epi32::<_MM_PERM_BADC>(data));
            walk(|step| match step {
                Step::Stripe { at, key } => {
                    let d = _mm512_loadu_si512(src.add(at) as *const __m512i);
                    if let Some(dst) = dst {
                        _mm512_stream_si512(dst.add(at) as *mut __m512i, d);
                    }
                    let mixed = _mm512_xor_si512(d, _mm512_loadu_si512(secret.add(key) as *const __m512i));
                    acc = _mm512_add_epi64(acc, _mm512_mul_epu32(mixed, _mm512_srli_epi64::<32>(mixed)));
                    data = _mm512_add_epi64(data, d);
                }
                Step::BlockEnd => {
                    let acc_in = neighbours(acc, data);
                    let k = _mm512_loadu_si512(secret.add(SCRAMBLE_KEY) as *const __m512i);
                    // acc ^ (acc >> 47) ^ key, times PRIME32_1 (as two 32x32 products).
                    let x = _mm512_ternarylogic_epi64::<0x96>(acc_in, _mm512_srli_epi64::<47>(acc_in), k);
                    let prime = _mm512_set1_epi32(PRIME32_1 as i32);
                    let (lo, hi) = (_mm512_mul_epu32(x, prime), _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), prime));
                    acc = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
                    data = _mm512_setzero_si512();
                }
            });
            std::mem::transmute::<__m512i, [u64; 8]>(neighbours(acc, data))
        };
        merge(&lanes, (PAGE_BYTES as u64).wrapping_mul(PRIME64_1))
    }

    /// XXH3-64 of the page at `src` on two AVX2 registers (lanes 0-3 and 4-7), storing it to
    /// `dst` as it goes when given.
    ///
    /// # Safety
    /// The CPU has AVX2 ([`isa`]); `src` points at 4096 readable bytes; `dst`, when given, at
    /// 4096 writable 64-byte aligned ones that do not overlap them.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn hash_avx2(src: *const u8, dst: Option<*mut u8>) -> u64 {
        let secret = SECRET.as_ptr();
        // SAFETY: as in `hash_avx512`; each half of a stripe is 32 bytes into it.
        let lanes: [u64; 8] = unsafe {
            let init = INIT.as_ptr() as *const __m256i;
            let mut acc = [_mm256_loadu_si256(init), _mm256_loadu_si256(init.add(1))];
            let mut data = [_mm256_setzero_si256(); 2];
            // Lanes 0 and 1 swap, 2 and 3 (within each 128-bit half of the register).
            let neighbours = |acc, data| _mm256_add_epi64(acc, _mm256_shuffle_epi32::<0b01_00_11_10>(data));
            walk(|step| match step {
                Step::Stripe { at, key } => {
                    let ds = [_mm256_loadu_si256(src.add(at) as *const __m256i), _mm256_loadu_si256(src.add(at + 32) as *const __m256i)];
                    if let Some(dst) = dst {
                        _mm256_stream_si256(dst.add(at) as *mut __m256i, ds[0]);
                        _mm256_stream_si256(dst.add(at + 32) as *mut __m256i, ds[1]);
                    }
                    for (h, d) in ds.into_iter().enumerate() {
                        let mixed = _mm256_xor_si256(d, _mm256_loadu_si256(secret.add(key + 32 * h) as *const __m256i));
                        acc[h] = _mm256_add_epi64(acc[h], _mm256_mul_epu32(mixed, _mm256_srli_epi64::<32>(mixed)));
                        data[h] = _mm256_add_epi64(data[h], d);
                    }
                }
                Step::BlockEnd => {
                    for h in 0..2 {
                        let acc_in = neighbours(acc[h], data[h]);
                        let k = _mm256_loadu_si256(secret.add(SCRAMBLE_KEY + 32 * h) as *const __m256i);
                        let x = _mm256_xor_si256(_mm256_xor_si256(acc_in, _mm256_srli_epi64::<47>(acc_in)), k);
                        let prime = _mm256_set1_epi32(PRIME32_1 as i32);
                        let (lo, hi) = (_mm256_mul_epu32(x, prime), _mm256_mul_epu32(_mm256_srli_epi64::<32>(x), prime));
                        acc[h] = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
                        data[h] = _mm256_setzero_si256();
                    }
                }
            });
            std::mem::transmute::<[__m256i; 2], [u64; 8]>([neighbours(acc[0], data[0]), neighbours(acc[1], data[1])])
        };
        merge(&lanes, (PAGE_BYTES as u64).wrapping_mul(PRIME64_1))
    }

    fn read64(at: usize) -> u64 {
        u64::from_le_bytes(SECRET[at..at + 8].try_into().unwrap())
    }

    /// XXH3's merge of the accumulators (secret from byte 11) and final avalanche.
    fn merge(acc: &[u64; 8], start: u64) -> u64 {
        let mut h = start;
        for i in 0..4 {
            let (a, b) = (acc[2 * i] ^ read64(11 + 16 * i), acc[2 * i + 1] ^ read64(11 + 16 * i + 8));
            let p = (a as u128) * (b as u128);
            h = h.wrapping_add((p as u64) ^ ((p >> 64) as u64));
        }
        h ^= h >> 37;
        h = h.wrapping_mul(PRIME_MX1);
        h ^ (h >> 32)
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
    fn a_page_hashes_as_xxh3_of_its_bytes_and_is_streamed_whole() {
        let data = bytes(300 * PAGE_BYTES);
        let mut pages: Vec<Vec<u8>> = data.chunks(PAGE_BYTES).map(|p| p.to_vec()).collect();
        pages.push(vec![0; PAGE_BYTES]);
        pages.push(vec![0xff; PAGE_BYTES]);
        // One bit set, in each block, in the last partial block and in the last stripe (the
        // page's final 64 bytes, hashed with its own secret offset).
        for bit in [0, 8 * 1023, 8 * 1024 + 3, 8 * 3071 + 7, 8 * 3072, 8 * 4031, 8 * 4032 + 1, 8 * 4095 + 7] {
            let mut p = vec![0u8; PAGE_BYTES];
            p[bit / 8] |= 1 << (bit % 8);
            pages.push(p);
        }
        let mut src = crate::memory::zeroed_pages(1);
        // Two pages: the second, never written, shows a store past the first.
        let mut dst = crate::memory::zeroed_pages(2);
        for (i, page) in pages.iter().enumerate() {
            let want = xxh3_64(page);
            crate::memory::page_bytes_mut(&mut src).copy_from_slice(page);
            let from = crate::memory::page_bytes(&src).as_ptr();
            // SAFETY: whole aligned pages of their own.
            assert_eq!(unsafe { xxh3_64_page(from) }, want, "page {i}");
            assert_eq!(unsafe { page_portable(from) }, want, "page {i}, portable");
            // Each way of streaming, on a destination filled with something else first.
            type Streamed = Box<dyn Fn(*mut u8, *const u8) -> u64>;
            // SAFETY (each call below): `dst` and `src` are whole, aligned pages of their own.
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut ways: Vec<(&str, Streamed)> = vec![
                ("streamed", Box::new(|d, s| unsafe { xxh3_64_page_streamed(d, s) })),
                ("portable", Box::new(|d, s| unsafe { page_streamed_portable(d, s) })),
            ];
            // Each vector width this CPU has, on its own and streaming.
            #[cfg(target_arch = "x86_64")]
            {
                type Width = unsafe fn(*const u8, Option<*mut u8>) -> u64;
                let widths: [(&str, bool, Width); 2] = [
                    ("AVX-512", std::arch::is_x86_feature_detected!("avx512f"), page_simd::hash_avx512),
                    ("AVX2", std::arch::is_x86_feature_detected!("avx2"), page_simd::hash_avx2),
                ];
                for (name, has, hash) in widths {
                    if !has {
                        if i == 0 {
                            eprintln!("note: this CPU has no {name}; the {name} page hash is not checked here");
                        }
                        continue;
                    }
                    // SAFETY: as above, on a CPU with the instructions (asked above).
                    assert_eq!(unsafe { hash(from, None) }, want, "page {i}, {name}");
                    ways.push((name, Box::new(move |d, s| unsafe { hash(s, Some(d)) })));
                }
            }
            for (way, f) in ways {
                crate::memory::page_bytes_mut(&mut dst).fill(0x5a);
                let to = crate::memory::page_bytes_mut(&mut dst).as_mut_ptr();
                assert_eq!(f(to, from), want, "page {i}, {way}");
                crate::memory::stream_fence();
                let (copy, past) = crate::memory::page_bytes(&dst).split_at(PAGE_BYTES);
                assert_eq!(copy, &page[..], "page {i}'s copy, {way}");
                assert!(past.iter().all(|&b| b == 0x5a), "page {i}, {way}: a store past the page");
            }
        }
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
