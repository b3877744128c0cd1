//! Tests of compressed page batches: round trips are bit-exact over a mix of compressible, zero
//! and random pages; the sender compresses only what shrinks; and every damaged or hostile
//! compressed payload (bad checksum, garbage, a bomb, short output, truncation, lying lengths)
//! is refused with its own error before a guest byte is written.

use std::os::fd::{AsRawFd, RawFd};

use crate::digest::xxh3::xxh3_64;

use super::batch::encode_batch_with;
use super::batch_tests::{recv_bytes, socketpair};
use super::*;
use crate::digest::{resident_bitmap, PageError};
use crate::memory::{GuestAddress, GuestMemory, MemoryOptions};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// Text-like page content: words from a small vocabulary, different on every page.
fn text_page(page: u64) -> Vec<u8> {
    let words = ["guest ", "memory ", "page ", "dirty ", "round ", "bhyve ", "return ", "struct ", "0x7f3a ", "INFO ", "\n    "];
    let mut x = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(PAGE as usize);
    while out.len() < PAGE as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
    }
    out.truncate(PAGE as usize);
    out
}

fn random_page(page: u64) -> Vec<u8> {
    let mut x = page.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1;
    (0..PAGE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn read(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read(GuestAddress(gpa), &mut buf).unwrap();
    buf
}

/// 8 MiB guest: pages 0..600 text, 600..700 zero (written), 700..900 random, 900..1500 text.
fn mixed_guest() -> GuestMemory {
    let mem = GuestMemory::new(&MemoryOptions::new(8 * MIB)).unwrap();
    for page in (0..600).chain(900..1500) {
        mem.write(GuestAddress(page * PAGE), &text_page(page)).unwrap();
    }
    mem.write(GuestAddress(600 * PAGE), &vec![0u8; 100 * PAGE as usize]).unwrap();
    for page in 700..900 {
        mem.write(GuestAddress(page * PAGE), &random_page(page)).unwrap();
    }
    mem
}

fn all_pages_ranges(mem: &GuestMemory) -> Vec<PageRange> {
    let seg = &mem.segments()[0];
    let words = vec![u64::MAX; seg.pages().div_ceil(64)];
    let (resident, _) = resident_bitmap(seg).unwrap();
    build_ranges_with_residency(seg, &words, &resident, true).unwrap()
}

/// Shuts the sending side down when the sender ends, even by a panic, so the receiver sees the end.
struct ShutdownOnDrop(RawFd);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        // SAFETY: shutting down a socket the test owns; it stays open until the test drops it.
        unsafe { libc::shutdown(self.0, libc::SHUT_WR) };
    }
}

/// Send `src`'s pages through a `Compressor` in `mode` to a fresh guest; returns the sender's
/// totals, the receiver's totals, the destination and the compressor.
fn round_trip(src: &GuestMemory, mode: CompressMode, hint: Option<f64>) -> (BatchStats, BatchStats, GuestMemory, u64) {
    let dst = GuestMemory::new(&MemoryOptions::new(src.memsize())).unwrap();
    let ranges = all_pages_ranges(src);
    let (a, b) = socketpair();
    let (sent, attempts) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let _end = ShutdownOnDrop(a.as_raw_fd());
            let mut c = Compressor::new(mode, hint);
            let mut total = BatchStats::default();
            let sent = c.send_ranges(a.as_raw_fd(), src, &ranges, None, |s| add(&mut total, s));
            sent.map(|()| (total, c.attempts)).map_err(|e| e.to_string())
        });
        let mut got = BatchStats::default();
        let mut batches = 0;
        let failure = loop {
            match recv_batch(b.as_raw_fd(), &dst) {
                Ok(s) => {
                    add(&mut got, s);
                    batches += 1;
                }
                Err(PageError::Truncated { got: 0, .. }) => break None,
                Err(e) => break Some(format!("batch {batches}: {e}")),
            }
        };
        // SAFETY: shutting down our own socket, so a sender still writing fails instead of waiting.
        unsafe { libc::shutdown(b.as_raw_fd(), libc::SHUT_RDWR) };
        let sender = sender.join();
        if let Some(why) = failure {
            panic!("{why}");
        }
        let (sent, attempts) = sender.unwrap().unwrap_or_else(|e| panic!("sending: {e}"));
        ((sent, got), attempts)
    });
    (sent.0, sent.1, dst, attempts)
}

fn add(total: &mut BatchStats, s: BatchStats) {
    total.ranges += s.ranges;
    total.data_pages += s.data_pages;
    total.zero_pages += s.zero_pages;
    total.data_bytes += s.data_bytes;
    total.wire_bytes += s.wire_bytes;
    total.compressed_batches += s.compressed_batches;
    total.saved_bytes += s.saved_bytes;
}

#[test]
fn compressible_zero_and_random_pages_round_trip_exactly_with_lz4() {
    let src = mixed_guest();
    let (sent, got, dst, attempts) = round_trip(&src, CompressMode::Lz4, None);
    assert_eq!(read(&dst, 0, 8 * MIB as usize), read(&src, 0, 8 * MIB as usize));
    assert_eq!(sent, got, "both ends count the same batches and bytes");
    assert_eq!(sent.data_pages, 1400);
    assert_eq!(sent.zero_pages, 2048 - 1400);
    assert!(sent.compressed_batches >= 4, "the 1200 text pages go compressed: {sent:?}");
    assert!(attempts > sent.compressed_batches, "the random pages were tried and went plain");
    assert!(sent.saved_bytes > 1200 * PAGE / 3, "text saves over a third: {sent:?}");
    let mut words = vec![0u64; 2048 / 64];
    dst.peek_dirty_segment(0, &mut words).unwrap();
    assert!(words.iter().all(|&w| w == 0), "received pages are not guest writes");
}

#[test]
fn random_pages_never_go_compressed() {
    let mem = GuestMemory::new(&MemoryOptions::new(4 * MIB)).unwrap();
    for page in 0..1024 {
        mem.write(GuestAddress(page * PAGE), &random_page(page)).unwrap();
    }
    let (sent, _, dst, attempts) = round_trip(&mem, CompressMode::Lz4, None);
    assert_eq!(sent.compressed_batches, 0);
    assert_eq!(attempts, 4, "lz4 tries every 1 MiB batch");
    assert_eq!(sent.wire_bytes, sent.data_bytes + (40 + 16) * 4, "plain batches: header, one range, the pages");
    assert_eq!(read(&dst, 0, 4 * MIB as usize), read(&mem, 0, 4 * MIB as usize));
}

#[test]
fn auto_backs_off_after_batches_that_do_not_pay() {
    let mem = GuestMemory::new(&MemoryOptions::new(64 * MIB)).unwrap();
    for page in 0..64 * MIB / PAGE {
        mem.write(GuestAddress(page * PAGE), &random_page(page)).unwrap();
    }
    // Incompressible: trials at MiB 0, 2, 5, 10, 19, 36, each followed by a skip twice the last
    // (1, 2, 4, 8, 16, 32 MiB); the last skip runs past the end.
    let (sent, _, dst, attempts) = round_trip(&mem, CompressMode::Auto, Some(1e6));
    assert_eq!(sent.compressed_batches, 0);
    assert_eq!(attempts, 6, "one trial per doubling of the back-off");
    assert_eq!(read(&dst, 0, 64 * MIB as usize), read(&mem, 0, 64 * MIB as usize));
}

#[test]
fn auto_compresses_text_on_a_slow_link_and_not_without_one() {
    let src = mixed_guest();
    // 1 MB/s: any saving pays for the compression time.
    let (slow, _, dst, _) = round_trip(&src, CompressMode::Auto, Some(1e6));
    assert!(slow.compressed_batches >= 4, "{slow:?}");
    assert_eq!(read(&dst, 0, 8 * MIB as usize), read(&src, 0, 8 * MIB as usize));
    // No hint and under LINK_SAMPLE_MIN written: the link is unknown, so compressing is assumed
    // not to pay; the first trial's block still goes compressed (the work is done) and then it
    // backs off.
    let (unknown, _, dst, attempts) = round_trip(&src, CompressMode::Auto, None);
    assert_eq!(attempts, 3, "trials at DATA MiB 0, 2 and 5 of 5.5");
    assert!(unknown.compressed_batches <= attempts);
    assert_eq!(read(&dst, 0, 8 * MIB as usize), read(&src, 0, 8 * MIB as usize));
}

#[test]
fn the_link_rate_is_the_lower_of_hint_and_measurement() {
    let c = Compressor::new(CompressMode::Auto, Some(5e6));
    assert_eq!(c.link_rate(), Some(5e6));
    assert_eq!(Compressor::new(CompressMode::Auto, None).link_rate(), None);
    assert_eq!(Compressor::new(CompressMode::Auto, Some(f64::NAN)).link_rate(), None, "a nonsense hint is no hint");
    assert_eq!(CompressMode::parse("zstd").unwrap_err(), "compression mode must be off, lz4 or auto; got \"zstd\"");
}

// -- hostile compressed batches -----------------------------------------------------------------

const SENTINEL: u8 = 0x5a;

/// A guest whose first 8 pages hold a sentinel, so any write shows.
fn victim() -> GuestMemory {
    let mem = GuestMemory::new(&MemoryOptions::new(MIB)).unwrap();
    mem.write(GuestAddress(0), &vec![SENTINEL; 8 * PAGE as usize]).unwrap();
    mem
}

fn untouched(mem: &GuestMemory) -> bool {
    read(mem, 0, 8 * PAGE as usize).iter().all(|&b| b == SENTINEL)
}

/// A compressed batch of `pages` DATA pages at gpa 4096 whose payload is `sum` ‖ `block`, the
/// header declaring `payload_len` (None: the real length).
fn compressed_batch(pages: u32, block: &[u8], sum: Option<u64>, payload_len: Option<u64>) -> Vec<u8> {
    let ranges = [PageRange { gpa: GuestAddress(PAGE), pages, kind: RangeKind::Data }];
    let payload = payload_len.unwrap_or(COMPRESSED_PREFIX + block.len() as u64);
    let mut bytes = encode_batch_with(GuestAddress(0), &ranges, BATCH_FLAG_LZ4, payload);
    bytes.extend_from_slice(&sum.unwrap_or_else(|| xxh3_64(block)).to_le_bytes());
    bytes.extend_from_slice(block);
    bytes
}

fn lz4(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
    let n = lz4_flex::block::compress_into(data, &mut out).unwrap();
    out.truncate(n);
    out
}

#[test]
fn a_well_formed_compressed_batch_is_received() {
    let mem = victim();
    let pages: Vec<u8> = (0..2).flat_map(text_page).collect();
    let stats = recv_bytes(&mem, &compressed_batch(2, &lz4(&pages), None, None)).unwrap();
    assert_eq!(read(&mem, PAGE, 2 * PAGE as usize), pages);
    assert_eq!((stats.data_pages, stats.compressed_batches), (2, 1));
    assert_eq!(stats.wire_bytes + stats.saved_bytes, 40 + 16 + 2 * PAGE);
}

#[test]
fn a_damaged_block_fails_its_checksum_before_decompression() {
    let mem = victim();
    let pages: Vec<u8> = (0..2).flat_map(text_page).collect();
    let mut batch = compressed_batch(2, &lz4(&pages), None, None);
    let last = batch.len() - 10;
    batch[last] ^= 0x40;
    let err = recv_bytes(&mem, &batch).unwrap_err();
    assert!(matches!(err, PageError::CompressedChecksum { .. }), "{err}");
    assert!(err.to_string().starts_with("compressed page data checksum mismatch"), "{err}");
    assert!(untouched(&mem));
}

#[test]
fn garbage_with_a_valid_checksum_is_refused_as_not_lz4() {
    let mem = victim();
    // A token promising a long literal run the block does not hold.
    let garbage = [0xf0u8, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = recv_bytes(&mem, &compressed_batch(1, &garbage, None, None)).unwrap_err();
    assert!(matches!(err, PageError::Decompress { data: 4096, .. }), "{err}");
    assert!(err.to_string().starts_with("compressed page data is not a valid LZ4 block of 4096 bytes"), "{err}");
    assert!(untouched(&mem));
}

#[test]
fn a_decompression_bomb_is_refused_at_the_tables_size() {
    let mem = victim();
    // 512 KiB of zeros compress to 2 KiB (LZ4 tops out near 255:1); the table claims one page.
    let bomb = lz4(&vec![0u8; 512 * 1024]);
    assert!((bomb.len() as u64) < PAGE);
    let err = recv_bytes(&mem, &compressed_batch(1, &bomb, None, None)).unwrap_err();
    assert!(matches!(err, PageError::Decompress { data: 4096, .. }), "{err}");
    assert!(untouched(&mem));
}

#[test]
fn a_block_that_decompresses_short_is_refused() {
    let mem = victim();
    let short = lz4(&text_page(1)[..4000]);
    let err = recv_bytes(&mem, &compressed_batch(1, &short, None, None)).unwrap_err();
    assert_eq!(err.to_string(), "compressed page data decompressed to 4000 bytes but the batch's DATA ranges hold 4096");
    assert!(untouched(&mem));
}

#[test]
fn a_truncated_compressed_payload_is_refused_before_any_write() {
    let mem = victim();
    let pages: Vec<u8> = (0..4).flat_map(text_page).collect();
    let batch = compressed_batch(4, &lz4(&pages), None, None);
    let err = recv_bytes(&mem, &batch[..batch.len() - 7]).unwrap_err();
    assert!(matches!(err, PageError::Truncated { what: "compressed page data", .. }), "{err}");
    assert!(untouched(&mem), "unlike a plain batch, nothing of a cut compressed batch is written");
}

#[test]
fn lying_compressed_lengths_are_refused_from_the_header() {
    let mem = victim();
    let block = lz4(&text_page(3));
    // A payload bigger than the data it claims to compress.
    let err = recv_bytes(&mem, &compressed_batch(1, &block, None, Some(COMPRESSED_PREFIX + PAGE + 1))).unwrap_err();
    assert!(matches!(err, PageError::CompressedPayloadLength { data: 4096, .. }), "{err}");
    // Only the checksum, no block.
    let err = recv_bytes(&mem, &compressed_batch(1, &[], None, None)).unwrap_err();
    assert!(matches!(err, PageError::CompressedPayloadLength { declared: 8, .. }), "{err}");
    // More page data than a compressed batch may carry: refused before reading the payload.
    let big = MAX_COMPRESSED_DATA as u32 / 4096 + 1;
    let mem_big = GuestMemory::new(&MemoryOptions::new(8 * MIB)).unwrap();
    let err = recv_bytes(&mem_big, &compressed_batch(big, &block, None, None)).unwrap_err();
    assert_eq!(err.to_string(), "compressed page batch carries 4198400 bytes of page data; a compressed batch carries 4096 to 4194304");
    // A compressed batch of zero ranges only.
    let zero = [PageRange { gpa: GuestAddress(PAGE), pages: 1, kind: RangeKind::Zero }];
    let mut bytes = encode_batch_with(GuestAddress(0), &zero, BATCH_FLAG_LZ4, 16);
    bytes.extend_from_slice(&[0; 16]);
    assert!(matches!(recv_bytes(&mem, &bytes).unwrap_err(), PageError::CompressedDataSize { data: 0, .. }));
    assert!(untouched(&mem));
}

#[test]
fn flags_other_than_lz4_are_still_refused() {
    let mem = victim();
    let ranges = [PageRange { gpa: GuestAddress(PAGE), pages: 1, kind: RangeKind::Data }];
    let bytes = encode_batch_with(GuestAddress(0), &ranges, 0x0002, PAGE);
    assert_eq!(recv_bytes(&mem, &bytes).unwrap_err().to_string(), "page batch has unknown flags 0x0002");
}

#[test]
fn random_garbage_after_a_valid_compressed_header_never_panics() {
    let mem = victim();
    let mut x = 0x1234_5678_9abc_def1u64;
    for len in 1..200usize {
        let block: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let pages = 1 + (len % 3) as u32;
        match recv_bytes(&mem, &compressed_batch(pages, &block, None, None)) {
            Err(PageError::Decompress { .. } | PageError::DecompressedLength { .. }) => {}
            Ok(_) => panic!("{len} random bytes decompressed to exactly {pages} pages"),
            Err(e) => panic!("unexpected error for {len} bytes: {e}"),
        }
    }
    assert!(untouched(&mem));
}
