//! Memory-core microbenchmarks: dirty harvest, page hashing, zero and residency detection,
//! page batches over a socketpair and loopback TCP, and the LZ4 block work of a compressed batch. Throughput is in bytes of guest memory
//! covered (harvest, residency) or read/moved (hash, zero, batch), so figures compare directly
//! with the machine's memcpy and loopback limits that tools/bench_memory.py prints beside them.
//!
//! Run: `cargo bench --bench memory` (add `-- --quick` for a fast pass).

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use vmm_core::digest::xxh3::{xxh3_64, xxh3_64_page, xxh3_64_page_streamed};
use vmm_core::digest::{chunk_hashes, commit_digest, hash_pages, memory_digest, resident_bitmap, split_zero_pages, DigestTracker};
use vmm_core::dirty::TrackingChoice;
use vmm_core::memory::{GuestAddress, GuestMemory, MemoryOptions, PAGE_SIZE};
use vmm_core::wire::{build_ranges_from_bitmap, recv_batch_tracked, send_batch, send_batch_tracked, PageRange, RangeKind};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Batches move 64 MiB; hashing and zero detection read 256 MiB, larger than any cache here and
/// the size the reference anchors (reference/qemu-anchors.md) measured xxh3 on.
const BUF: u64 = 64 * MIB;
const SCAN: u64 = 256 * MIB;

fn configure<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    g
}

fn guest(size: u64) -> GuestMemory {
    let mut opts = MemoryOptions::new(size);
    opts.tracking = TrackingChoice::Soft;
    GuestMemory::new(&opts).expect("guest memory for the benchmark")
}

/// `size` bytes of pseudo-random (incompressible, never zero) pages from GPA 0.
fn random_guest(size: u64) -> GuestMemory {
    let mem = guest(size);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut chunk = vec![0u8; MIB as usize];
    for at in (0..size).step_by(MIB as usize) {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        mem.write(GuestAddress(at), &chunk).unwrap();
    }
    clear_dirty(&mem);
    mem
}

fn clear_dirty(mem: &GuestMemory) {
    for (i, seg) in mem.segments().iter().enumerate() {
        let mut words = vec![0u64; seg.pages().div_ceil(64)];
        mem.get_and_clear_dirty_segment(i, &mut words).unwrap();
    }
}

fn all_pages(pages: usize) -> Vec<u64> {
    let mut words = vec![u64::MAX; pages.div_ceil(64)];
    if !pages.is_multiple_of(64) {
        *words.last_mut().unwrap() = (1u64 << (pages % 64)) - 1;
    }
    words
}

fn dirty_harvest(c: &mut Criterion) {
    let mem = guest(64 * GIB);
    let mut words: Vec<Vec<u64>> = mem.segments().iter().map(|s| vec![0u64; s.pages().div_ceil(64)]).collect();
    let mut g = configure(c, "dirty_harvest_soft_64GiB");
    g.throughput(Throughput::Bytes(64 * GIB));
    g.bench_function("clean", |b| {
        b.iter(|| {
            for (i, w) in words.iter_mut().enumerate() {
                black_box(mem.get_and_clear_dirty_segment(i, w).unwrap());
            }
        })
    });
    g.bench_function("fully_dirty", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Dirty every page by setting its bit only: touching 64 GiB is not the point.
                for (seg, w) in mem.segments().iter().zip(words.iter_mut()) {
                    seg.dirty_log().mark(0, seg.pages());
                    w.fill(0);
                }
                let start = Instant::now();
                for (i, w) in words.iter_mut().enumerate() {
                    black_box(mem.get_and_clear_dirty_segment(i, w).unwrap());
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();

    let mut g = configure(c, "resident_bitmap_mincore");
    g.throughput(Throughput::Bytes(61 * GIB));
    g.bench_function("untouched_61GiB_highmem", |b| b.iter(|| black_box(resident_bitmap(&mem.segments()[1]).unwrap())));
    g.finish();
}

fn hashing_and_zero(c: &mut Criterion) {
    let random = random_guest(SCAN);
    let seg = &random.segments()[0];
    let pages = seg.pages();
    let words = all_pages(pages);
    let mut g = configure(c, "page_hash_256MiB");
    g.throughput(Throughput::Bytes(SCAN));
    g.bench_function("xxh3_64_per_page", |b| b.iter(|| black_box(hash_pages(seg, 0, pages as u64).unwrap())));
    g.bench_function("xxh3_128_1MiB_chunks", |b| b.iter(|| black_box(chunk_hashes(seg, MIB).unwrap())));
    // The same pages hashed without asking for them ahead (hash_pages and the migration's hash
    // prefetch two pages ahead): what the prefetch buys on cold memory.
    g.bench_function("xxh3_64_per_page_no_prefetch", |b| {
        // SAFETY: every page lies in the segment, which `random` keeps mapped.
        let page = |i: usize| unsafe { std::slice::from_raw_parts(seg.as_ptr().add(i * 4096), 4096) };
        b.iter(|| black_box((0..pages).map(|i| xxh3_64(page(i))).collect::<Vec<u64>>()))
    });
    g.bench_function("xxh3_128_memory_digest", |b| b.iter(|| black_box(memory_digest(&random, false).unwrap())));
    g.finish();

    // Pages in the cache, as a receiver hashes its staging buffer: 1 MiB, in L2 here. twox-hash's
    // one-shot hash (AVX2) against the page hash the digest uses (AVX-512 where the CPU has it),
    // and that hash with the page streamed into guest memory in the same pass.
    let staged = &random.segments()[0];
    let staged_pages = (MIB / PAGE_SIZE as u64) as usize;
    // SAFETY: the first MiB of the segment, which `random` keeps mapped.
    let page = |i: usize| unsafe { staged.as_ptr().add(i * PAGE_SIZE) };
    let mut g = configure(c, "page_hash_1MiB_in_cache");
    g.throughput(Throughput::Bytes(MIB));
    g.bench_function("twox_xxh3_64", |b| {
        // SAFETY: as above.
        b.iter(|| black_box((0..staged_pages).map(|i| xxh3_64(unsafe { std::slice::from_raw_parts(page(i), PAGE_SIZE) })).sum::<u64>()))
    });
    // SAFETY: as above.
    g.bench_function("xxh3_64_page", |b| b.iter(|| black_box((0..staged_pages).map(|i| unsafe { xxh3_64_page(page(i)) }).sum::<u64>())));
    let into = guest(BUF);
    let slots = (BUF / MIB) as usize;
    let mut slot = 0;
    g.bench_function("xxh3_64_page_streamed_into_64MiB", |b| {
        b.iter(|| {
            slot = (slot + 1) % slots;
            let to = into.segments()[0].as_ptr();
            // SAFETY: source pages as above; each destination page lies in `into`'s segment, page-aligned.
            black_box(
                (0..staged_pages)
                    .map(|i| unsafe { xxh3_64_page_streamed(to.add((slot * staged_pages + i) * PAGE_SIZE), page(i)) })
                    .sum::<u64>(),
            )
        })
    });
    g.finish();

    // Zero pages written explicitly, so they are resident and must really be read.
    let zeros = guest(SCAN);
    zeros.write(GuestAddress(0), &vec![0u8; SCAN as usize]).unwrap();
    clear_dirty(&zeros);
    let mut g = configure(c, "zero_detect_256MiB");
    g.throughput(Throughput::Bytes(SCAN));
    g.bench_function("all_zero_pages", |b| b.iter(|| black_box(split_zero_pages(&zeros.segments()[0], &words).unwrap())));
    g.bench_function("random_pages_early_exit", |b| b.iter(|| black_box(split_zero_pages(seg, &words).unwrap())));
    g.bench_function("build_ranges_detect_zero_all_zero", |b| {
        b.iter(|| black_box(build_ranges_from_bitmap(&zeros.segments()[0], &words, true).unwrap()))
    });
    // A warm migration's round 0 of a guest whose pages all hold data: one read per page, at its
    // first bytes, across 256 MiB (more than the caches hold).
    g.bench_function("build_ranges_detect_zero_random", |b| b.iter(|| black_box(build_ranges_from_bitmap(seg, &words, true).unwrap())));
    g.finish();
}

/// The migration's commit digest: from scratch over 256 MiB of random pages (what `verify=full`
/// and a warm migration pay), and kept current by a tracker where 1,000 scattered pages changed
/// (what an idle guest's final round leaves for the commit), and with nothing stale (the combine
/// alone, for 256 MiB and for a 64 GiB guest).
fn commit_digests(c: &mut Criterion) {
    let random = random_guest(SCAN);
    let seg = random.segments()[0].clone();
    let mut g = configure(c, "commit_digest");
    g.throughput(Throughput::Bytes(SCAN));
    g.bench_function("from_scratch_256MiB", |b| b.iter(|| black_box(commit_digest(&random).unwrap())));
    g.finish();

    let tracker = DigestTracker::new(&random).unwrap();
    tracker.digest().unwrap();
    let mut g = configure(c, "commit_digest_tracked");
    g.throughput(Throughput::Bytes(1000 * PAGE_SIZE as u64));
    g.bench_function("1000_stale_pages_of_256MiB", |b| {
        b.iter(|| {
            for i in 0..1000 {
                tracker.mark_pages(&seg, i * 61 % seg.pages(), 1).unwrap();
            }
            black_box(tracker.digest().unwrap())
        })
    });
    g.finish();

    let sparse = guest(64 * GIB);
    let big = DigestTracker::new(&sparse).unwrap();
    big.digest().unwrap();
    let mut g = configure(c, "commit_digest_combine");
    g.bench_function("nothing_stale_256MiB", |b| b.iter(|| black_box(tracker.digest().unwrap())));
    g.bench_function("nothing_stale_64GiB", |b| b.iter(|| black_box(big.digest().unwrap())));
    g.finish();
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fresh fds into the array we own.
    assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Send `ranges` from `src` through `tx` while a thread receives them into `dst` through `rx`
/// and acknowledges each batch with one byte, so each timed send includes full delivery. With
/// `trackers` (source's, destination's), both ends hash the pages as they move, as a migration does.
#[allow(clippy::too_many_arguments)]
fn bench_transfer(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    src: &GuestMemory,
    dst: &GuestMemory,
    ranges: &[PageRange],
    tx: &mut (impl Write + AsRawFd),
    rx: &mut (impl Read + Write + AsRawFd + Send),
    trackers: Option<(&DigestTracker, &DigestTracker)>,
) {
    let (theirs, mine) = trackers.unzip();
    let tx_fd: RawFd = tx.as_raw_fd();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let fd = rx.as_raw_fd();
            // Every batch is acknowledged; the empty one ends the benchmark (whether or not the
            // timed sends ran: a filter that skips this one sends only it).
            while let Ok(got) = recv_batch_tracked(fd, dst, mine) {
                rx.write_all(&[1]).unwrap();
                if got.data_pages + got.zero_pages == 0 {
                    break;
                }
            }
        });
        g.bench_function(name, |b| {
            b.iter(|| {
                send_batch_tracked(tx_fd, src, ranges, theirs).unwrap();
                let mut ack = [0u8; 1];
                // SAFETY: reading one byte into a local buffer.
                let n = unsafe { libc::read(tx_fd, ack.as_mut_ptr() as *mut libc::c_void, 1) };
                assert_eq!(n, 1);
            })
        });
        // The empty batch ends the receiver's loop.
        send_batch(tx_fd, src, &[]).unwrap();
        let mut ack = [0u8; 1];
        tx.flush().unwrap();
        // SAFETY: reading one byte into a local buffer; this ack must not leak into the next run.
        assert_eq!(unsafe { libc::read(tx_fd, ack.as_mut_ptr() as *mut libc::c_void, 1) }, 1);
        receiver.join().unwrap();
    });
}

struct Fd(OwnedFd);
impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: reading into a buffer we borrow mutably.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a buffer we borrow.
        let n = unsafe { libc::write(self.0.as_raw_fd(), buf.as_ptr() as *const libc::c_void, buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn batches(c: &mut Criterion) {
    let src = random_guest(BUF);
    let dst = guest(BUF);
    let pages = (BUF as usize / PAGE_SIZE) as u32;
    let contiguous = [PageRange { gpa: GuestAddress(0), pages, kind: RangeKind::Data }];
    // Every other page: 8192 one-page ranges, 32 MiB of data; the iovec-per-range worst case.
    let scattered: Vec<PageRange> =
        (0..pages as u64 / 2).map(|i| PageRange { gpa: GuestAddress(i * 2 * PAGE_SIZE as u64), pages: 1, kind: RangeKind::Data }).collect();

    let mut g = configure(c, "batch_send_recv_64MiB_random");
    g.throughput(Throughput::Bytes(BUF));
    let (a, b) = socketpair();
    bench_transfer(&mut g, "unix_socketpair_contiguous", &src, &dst, &contiguous, &mut Fd(a), &mut Fd(b), None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    bench_transfer(&mut g, "tcp_loopback_contiguous", &src, &dst, &contiguous, &mut client, &mut server, None);
    // The same with the commit digest kept on both ends, a hash window at a time while it is in
    // the cache: what hashing adds to a migration's copies.
    let (theirs, mine) = (DigestTracker::new(&src).unwrap(), DigestTracker::new(&dst).unwrap());
    bench_transfer(&mut g, "tcp_loopback_contiguous_hashed", &src, &dst, &contiguous, &mut client, &mut server, Some((&theirs, &mine)));
    g.throughput(Throughput::Bytes(BUF / 2));
    bench_transfer(&mut g, "tcp_loopback_scattered_1page_ranges", &src, &dst, &scattered, &mut client, &mut server, None);
    g.finish();
}

/// `len` bytes of text-like content (words of a small vocabulary): LZ4 takes it to about half.
fn text_bytes(len: usize) -> Vec<u8> {
    let words = ["the ", "guest ", "memory ", "page ", "dirty ", "round ", "bhyve ", "return ", "struct ", "0x7f3a ", "INFO ", "\n    "];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

/// The per-batch hot path of `wire::compress`: compressing one 1 MiB batch (text-like and
/// random: what a trial costs when it does not pay) and decompressing it on the receiver.
fn compression(c: &mut Criterion) {
    let block = 256 * PAGE_SIZE;
    let text = text_bytes(block);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let random: Vec<u8> = (0..block / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(block)];
    let mut back = vec![0u8; block];
    let mut g = configure(c, "lz4_1MiB_batch");
    g.throughput(Throughput::Bytes(block as u64));
    g.bench_function("compress_text", |b| b.iter(|| lz4_flex::block::compress_into(black_box(&text), &mut out).unwrap()));
    g.bench_function("compress_random", |b| b.iter(|| lz4_flex::block::compress_into(black_box(&random), &mut out).unwrap()));
    let n = lz4_flex::block::compress_into(&text, &mut out).unwrap();
    let packed = out[..n].to_vec();
    g.bench_function("decompress_text", |b| b.iter(|| lz4_flex::block::decompress_into(black_box(&packed), &mut back).unwrap()));
    g.finish();
}

criterion_group!(benches, dirty_harvest, hashing_and_zero, commit_digests, compression, batches);
criterion_main!(benches);
