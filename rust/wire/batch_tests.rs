//! Tests of the batch format and its fd I/O: round trips are bit-exact and leave received pages
//! clean; every kind of damaged or hostile stream is refused with its own clear error before
//! guest memory is touched.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::digest::xxh3::Xxh3Short;

use super::batch::encode_batch;
use super::*;
use crate::digest::{commit_digest, memory_digest, resident_bitmap, DigestTracker, Direction, PageError, ResidencySource};
use crate::dirty::TrackingChoice;
use crate::memory::{GuestAddress, GuestMemory, MemoryOptions, HIGHMEM_BASE};

const MIB: u64 = 1 << 20;

/// 4 MiB lowmem + 4 MiB highmem, so batches can name either segment.
fn two_segment_guest(tracking: TrackingChoice) -> Option<GuestMemory> {
    let mut opts = MemoryOptions::new(8 * MIB);
    opts.lowmem_limit = 4 * MIB;
    opts.tracking = tracking;
    match GuestMemory::new(&opts) {
        Ok(m) => Some(m),
        Err(e) if tracking == TrackingChoice::Kernel => {
            eprintln!("skipping the kernel-backend case: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

pub(super) fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fresh fds into the array we own.
    assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fresh fds into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

pub(super) fn write_fd(fd: RawFd, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: writing from a slice we borrow.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr() as *const libc::c_void, bytes.len() - done) };
        assert!(n > 0, "write: {}", std::io::Error::last_os_error());
        done += n as usize;
    }
}

/// Feed `bytes` to `recv_batch` through a pipe, as a stream that then ends.
pub(super) fn recv_bytes(mem: &GuestMemory, bytes: &[u8]) -> Result<BatchStats, PageError> {
    let (r, w) = pipe();
    let bytes = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        write_fd(w.as_raw_fd(), &bytes);
        drop(w);
    });
    let result = recv_batch(r.as_raw_fd(), mem);
    drop(r);
    let _ = writer.join();
    result
}

/// A deterministic, incompressible-looking fill for page `page`.
fn page_fill(page: u64) -> Vec<u8> {
    let mut x = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read(GuestAddress(gpa), &mut buf).unwrap();
    buf
}

fn harvest(mem: &GuestMemory, index: usize) -> Vec<u64> {
    let mut words = vec![0u64; mem.segments()[index].pages().div_ceil(64)];
    mem.get_and_clear_dirty_segment(index, &mut words).unwrap();
    words
}

fn round_trip(tracking: TrackingChoice, use_pipe: bool) {
    let (Some(src), Some(dst)) = (two_segment_guest(tracking), two_segment_guest(tracking)) else { return };
    let data_pages = [0u64, 1, 2, 9, 63, 64, 200, 1023];
    let zero_written = [3u64, 4, 100]; // touched on the source, but zero
    for &p in &data_pages {
        src.write(GuestAddress(HIGHMEM_BASE + p * 4096), &page_fill(p)).unwrap();
    }
    for &p in &zero_written {
        src.write(GuestAddress(HIGHMEM_BASE + p * 4096), &[0; 4096]).unwrap();
    }
    // The destination already holds data where ZERO ranges will land, and beside them.
    for p in [3u64, 100, 500] {
        dst.write(GuestAddress(HIGHMEM_BASE + p * 4096), &page_fill(9999)).unwrap();
    }
    harvest(&dst, 1);

    let words = harvest(&src, 1);
    let ranges = build_ranges_from_bitmap(&src.segments()[1], &words, true).unwrap();
    assert!(ranges.iter().any(|r| r.kind == RangeKind::Zero) && ranges.iter().any(|r| r.kind == RangeKind::Data));

    let (rx, tx) = if use_pipe { pipe() } else { socketpair() };
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| send_batch(tx.as_raw_fd(), &src, &ranges).unwrap());
        let got = recv_batch(rx.as_raw_fd(), &dst).unwrap();
        let sent = sender.join().unwrap();
        assert_eq!(got, sent, "both sides count the same batch");
        sent
    });
    assert_eq!((sent.data_pages, sent.zero_pages, sent.data_bytes), (8, 3, 8 * 4096));
    assert_eq!(sent.wire_bytes, 40 + 16 * sent.ranges + 8 * 4096);

    for p in data_pages.iter().chain(&zero_written) {
        assert_eq!(read(&dst, HIGHMEM_BASE + p * 4096, 4096), read(&src, HIGHMEM_BASE + p * 4096, 4096), "page {p}");
    }
    assert_eq!(read(&dst, HIGHMEM_BASE + 500 * 4096, 4096), page_fill(9999), "pages outside the batch are left alone");
    assert!(harvest(&dst, 1).iter().all(|&w| w == 0), "received pages must not be dirty ({tracking:?})");
    assert!(harvest(&dst, 0).iter().all(|&w| w == 0));
}

#[test]
fn tracked_batches_hash_every_page_they_move_on_both_sides() {
    let (Some(src), Some(dst)) = (two_segment_guest(TrackingChoice::Soft), two_segment_guest(TrackingChoice::Soft)) else { return };
    // 130 pages in a row (more than one hash window, across chunk boundaries), and scattered
    // pages, two of them in one chunk and in one window.
    for p in (3..133).chain([140, 150, 1000]) {
        src.write(GuestAddress(HIGHMEM_BASE + p * 4096), &page_fill(p)).unwrap();
    }
    dst.write(GuestAddress(HIGHMEM_BASE + 200 * 4096), &page_fill(200)).unwrap(); // to be cleared by a ZERO range
    src.write(GuestAddress(HIGHMEM_BASE + 200 * 4096), &[0; 4096]).unwrap();
    let theirs = DigestTracker::new(&src).unwrap(); // all stale: only what is sent gets hashed
    let mine = DigestTracker::new(&dst).unwrap();
    mine.digest().unwrap(); // everything hashed: from here only what arrives makes it change
    let words = harvest(&src, 1);
    let ranges = build_ranges_from_bitmap(&src.segments()[1], &words, true).unwrap();
    assert!(ranges.iter().any(|r| r.kind == RangeKind::Zero));
    let (rx, tx) = socketpair();
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| send_batch_tracked(tx.as_raw_fd(), &src, &ranges, Some(&theirs)).unwrap());
        recv_batch_tracked(rx.as_raw_fd(), &dst, Some(&mine)).unwrap();
        sender.join().unwrap()
    });
    let all_pages: u64 = src.segments().iter().map(|s| s.pages() as u64).sum();
    assert_eq!(theirs.stale_pages(), all_pages - sent.data_pages - sent.zero_pages, "the sender hashed exactly what it sent");
    assert_eq!(mine.stale_pages(), 0, "the receiver hashed every page it wrote, ZERO ones too");
    assert_eq!(mine.digest().unwrap(), commit_digest(&dst).unwrap());
    assert_eq!(mine.digest().unwrap(), commit_digest(&src).unwrap());
    assert_eq!(theirs.digest().unwrap(), commit_digest(&src).unwrap());
}

#[test]
fn split_batches_bounds_ranges_and_data_and_loses_no_page() {
    let r = |page: u64, pages: u32, kind| PageRange { gpa: GuestAddress(page * 4096), pages, kind };
    let ranges = [r(0, 10, RangeKind::Data), r(10, 100, RangeKind::Zero), r(110, 7, RangeKind::Data), r(200, 1, RangeKind::Data)];
    let batches = split_batches(&ranges, 4);
    for b in &batches {
        assert!(b.iter().filter(|x| x.kind == RangeKind::Data).map(|x| x.pages).sum::<u32>() <= 4, "{b:?}");
    }
    let flat: Vec<(u64, RangeKind)> =
        batches.iter().flatten().flat_map(|x| (0..x.pages as u64).map(move |i| (x.gpa.0 / 4096 + i, x.kind))).collect();
    let want: Vec<(u64, RangeKind)> = ranges.iter().flat_map(|x| (0..x.pages as u64).map(move |i| (x.gpa.0 / 4096 + i, x.kind))).collect();
    assert_eq!(flat, want, "the same pages, in order, of the same kinds");
    assert_eq!(batches[0], vec![r(0, 4, RangeKind::Data)]);
    assert_eq!(batches[2], vec![r(8, 2, RangeKind::Data), r(10, 100, RangeKind::Zero), r(110, 2, RangeKind::Data)]);
    assert!(split_batches(&[], 4).is_empty());
    let many: Vec<PageRange> = (0..MAX_RANGES as u64 + 5).map(|i| r(2 * i, 1, RangeKind::Zero)).collect();
    let cut = split_batches(&many, 4);
    assert_eq!(cut.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_RANGES as usize, 5]);
}

#[test]
fn split_batches_cuts_a_data_range_only_at_2_mib_guest_addresses() {
    let r = |page: u64, pages: u32, kind| PageRange { gpa: GuestAddress(page * 4096), pages, kind };
    // The zero page at 3 would put every 4096-page cut mid-region; the range at 12800 starts on a
    // region with 84 pages of room left, so it starts the next batch instead.
    let ranges = [
        r(0, 3, RangeKind::Data),
        r(3, 1, RangeKind::Zero),
        r(4, 10_000, RangeKind::Data),
        r(10_240, 2200, RangeKind::Data),
        r(12_800, 1000, RangeKind::Data),
        r(20_000, 100, RangeKind::Data),
    ];
    let batches = split_batches(&ranges, 4096);
    let flat: Vec<(u64, RangeKind)> =
        batches.iter().flatten().flat_map(|x| (0..x.pages as u64).map(move |i| (x.gpa.0 / 4096 + i, x.kind))).collect();
    let want: Vec<(u64, RangeKind)> = ranges.iter().flat_map(|x| (0..x.pages as u64).map(move |i| (x.gpa.0 / 4096 + i, x.kind))).collect();
    assert_eq!(flat, want, "the same pages, in order, of the same kinds");
    let starts: Vec<u64> = batches.iter().map(|b| b[0].gpa.0 / 4096).collect();
    let data: Vec<u32> = batches.iter().map(|b| b.iter().filter(|x| x.kind == RangeKind::Data).map(|x| x.pages).sum()).collect();
    assert_eq!(starts, vec![0, 4096, 8192, 12_800]);
    assert_eq!(data, vec![4095, 4096, 1812 + 2200, 1000 + 100]);
    for b in &batches[1..] {
        assert_eq!(b[0].gpa.0 % (2 << 20), 0, "a split range resumes on a region: {:?}", b[0]);
    }
    // Below two regions a batch, cuts are where the data count says.
    assert_eq!(split_batches(&[r(1, 1000, RangeKind::Data)], 600).iter().map(|b| b[0].pages).collect::<Vec<_>>(), vec![600, 400]);
}

#[test]
fn round_trip_over_a_socketpair_is_bit_exact_and_leaves_pages_clean() {
    round_trip(TrackingChoice::Soft, false);
}

#[test]
fn round_trip_over_a_pipe_uses_writev_and_is_bit_exact() {
    round_trip(TrackingChoice::Soft, true);
}

#[test]
fn round_trip_with_the_kernel_backend_leaves_received_pages_clean() {
    round_trip(TrackingChoice::Kernel, false);
}

#[test]
fn zero_ranges_on_a_fresh_destination_stay_unpopulated() {
    let src = two_segment_guest(TrackingChoice::Soft).unwrap();
    let dst = two_segment_guest(TrackingChoice::Soft).unwrap();
    let ranges = [PageRange { gpa: GuestAddress(0), pages: 1024, kind: RangeKind::Zero }];
    let (rx, tx) = socketpair();
    send_batch(tx.as_raw_fd(), &src, &ranges).unwrap();
    let stats = recv_batch(rx.as_raw_fd(), &dst).unwrap();
    assert_eq!((stats.zero_pages, stats.data_bytes, stats.wire_bytes), (1024, 0, 56));
    let (resident, source) = resident_bitmap(&dst.segments()[0]).unwrap();
    if source == ResidencySource::Mincore {
        assert!(resident.iter().all(|&w| w == 0), "4 MiB of zero pages must cost the destination nothing");
    }
}

#[test]
fn an_empty_batch_round_trips() {
    let mem = two_segment_guest(TrackingChoice::Soft).unwrap();
    let (rx, tx) = socketpair();
    send_batch(tx.as_raw_fd(), &mem, &[]).unwrap();
    assert_eq!(recv_batch(rx.as_raw_fd(), &mem).unwrap(), BatchStats { wire_bytes: 40, ..Default::default() });
}

#[test]
fn wired_destination_zero_ranges_are_cleared_by_memset() {
    let mut opts = MemoryOptions::new(MIB);
    opts.wired = true;
    let dst = match GuestMemory::new(&opts) {
        Ok(m) => m,
        Err(e) => return eprintln!("skipping: {e}"),
    };
    dst.write(GuestAddress(4096), &page_fill(1)).unwrap();
    let bytes = encode_batch(GuestAddress(0), &[PageRange { gpa: GuestAddress(4096), pages: 2, kind: RangeKind::Zero }]);
    recv_bytes(&dst, &bytes).unwrap();
    assert_eq!(read(&dst, 4096, 4096), vec![0u8; 4096]);
}

// ---- the sender refuses what the receiver would ----

#[test]
fn send_refuses_ranges_the_receiver_would_refuse() {
    let mem = two_segment_guest(TrackingChoice::Soft).unwrap();
    let (_rx, tx) = socketpair();
    let across = [
        PageRange { gpa: GuestAddress(0), pages: 1, kind: RangeKind::Data },
        PageRange { gpa: GuestAddress(HIGHMEM_BASE), pages: 1, kind: RangeKind::Data },
    ];
    let err = send_batch(tx.as_raw_fd(), &mem, &across).unwrap_err();
    assert_eq!(err.to_string(), "range 1 at gpa 0x100000000 of 1 pages runs past segment 'lowmem' (0x0..0x400000)");
    let too_many: Vec<PageRange> =
        (0..MAX_RANGES as u64 + 1).map(|i| PageRange { gpa: GuestAddress(i * 4096), pages: 1, kind: RangeKind::Zero }).collect();
    assert!(matches!(send_batch(tx.as_raw_fd(), &mem, &too_many), Err(PageError::BadSendRanges { .. })));
    let unmapped = [PageRange { gpa: GuestAddress(3 << 30), pages: 1, kind: RangeKind::Data }];
    assert!(matches!(send_batch(tx.as_raw_fd(), &mem, &unmapped), Err(PageError::Memory(_))));
}

#[test]
fn send_to_a_closed_peer_is_an_error_not_a_signal() {
    let mem = two_segment_guest(TrackingChoice::Soft).unwrap();
    let (rx, tx) = socketpair();
    drop(rx);
    let ranges = [PageRange { gpa: GuestAddress(0), pages: 1024, kind: RangeKind::Data }];
    let err = send_batch(tx.as_raw_fd(), &mem, &ranges).unwrap_err();
    assert_eq!(err.errno(), libc::EPIPE, "{err}");
}

// ---- hostile and damaged streams ----

/// Recompute the checksum after a test patched header or table bytes.
fn reseal(bytes: &mut [u8]) {
    let table_end = 40 + u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize * 16;
    let mut h = Xxh3Short::new();
    h.update(&bytes[..32]);
    h.update(&bytes[40..table_end.min(bytes.len())]);
    let sum = h.digest();
    bytes[32..40].copy_from_slice(&sum.to_le_bytes());
}

/// A valid two-range batch for lowmem: 2 DATA pages at 0x1000, 3 ZERO pages at 0x10000.
fn valid_batch() -> Vec<u8> {
    let ranges = [
        PageRange { gpa: GuestAddress(0x1000), pages: 2, kind: RangeKind::Data },
        PageRange { gpa: GuestAddress(0x10000), pages: 3, kind: RangeKind::Zero },
    ];
    let mut bytes = encode_batch(GuestAddress(0), &ranges);
    bytes.extend_from_slice(&page_fill(1));
    bytes.extend_from_slice(&page_fill(2));
    bytes
}

fn refused(mutate: impl FnOnce(&mut Vec<u8>)) -> PageError {
    let mem = two_segment_guest(TrackingChoice::Soft).unwrap();
    let before = memory_digest(&mem, true).unwrap();
    let mut bytes = valid_batch();
    mutate(&mut bytes);
    let err = recv_bytes(&mem, &bytes).unwrap_err();
    if !matches!(err, PageError::Truncated { what: "page data", .. }) {
        assert_eq!(memory_digest(&mem, true).unwrap(), before, "refused before touching guest memory: {err}");
    }
    err
}

#[test]
fn the_valid_batch_is_accepted() {
    let mem = two_segment_guest(TrackingChoice::Soft).unwrap();
    let stats = recv_bytes(&mem, &valid_batch()).unwrap();
    assert_eq!((stats.data_pages, stats.zero_pages), (2, 3));
    assert_eq!(read(&mem, 0x2000, 4096), page_fill(2));
}

#[test]
fn a_stream_that_is_not_a_batch_is_refused_by_its_magic() {
    let err = refused(|b| b[..4].copy_from_slice(b"HTTP"));
    assert_eq!(err.to_string(), "not a page batch: magic 0x50545448, expected 0x42504d56");
}

#[test]
fn a_newer_version_and_unknown_flags_are_refused() {
    let err = refused(|b| b[4] = 2);
    assert_eq!(err.to_string(), "page batch version 2 is not one this vmmpy reads (1)");
    // 0x0001 is LZ4 (compress_tests); every other bit is unknown.
    assert!(matches!(refused(|b| b[6] = 2), PageError::UnknownFlags { got: 2 }));
    assert!(matches!(refused(|b| b[7] = 0x80), PageError::UnknownFlags { got: 0x8000 }));
    assert!(matches!(refused(|b| b[21] = 1), PageError::ReservedNotZero { .. }));
}

#[test]
fn a_flipped_bit_in_header_or_table_fails_the_checksum() {
    for at in [9usize, 25, 40, 48, 60] {
        let err = refused(|b| b[at] ^= 0x10);
        assert!(matches!(err, PageError::HeaderChecksum { .. }), "byte {at}: {err}");
        assert!(err.to_string().starts_with("batch header checksum mismatch: got 0x"), "{err}");
    }
}

#[test]
fn huge_range_counts_are_refused_without_allocating() {
    let err = refused(|b| b[16..20].copy_from_slice(&u32::MAX.to_le_bytes()));
    assert_eq!(err.to_string(), "page batch declares 4294967295 ranges, more than the 65536 a batch may hold");
}

#[test]
fn truncated_streams_say_where_they_ended() {
    let err = refused(|b| b.truncate(10));
    assert_eq!(err.to_string(), "page batch stream ended inside the batch header: got 10 of 40 bytes");
    let err = refused(|b| b.truncate(50));
    assert_eq!(err.to_string(), "page batch stream ended inside the range table: got 10 of 32 bytes");
    let err = refused(|b| b.truncate(72 + 5000));
    assert_eq!(err.to_string(), "page batch stream ended inside the page data: got 5000 of 8192 bytes");
    assert!(matches!(refused(|b| b.clear()), PageError::Truncated { got: 0, .. }));
}

fn set_range(b: &mut [u8], index: usize, gpa: u64, pages: u32, kind: u8) {
    let at = 40 + index * 16;
    b[at..at + 8].copy_from_slice(&gpa.to_le_bytes());
    b[at + 8..at + 12].copy_from_slice(&pages.to_le_bytes());
    b[at + 12] = kind;
    reseal(b);
}

#[test]
fn ranges_outside_the_segment_are_refused_with_their_address() {
    let err = refused(|b| set_range(b, 1, 0x3ff000, 3, 1));
    assert_eq!(err.to_string(), "range 1 at gpa 0x3ff000 of 3 pages runs past segment 'lowmem' (0x0..0x400000)");
    let err = refused(|b| set_range(b, 1, 0x10000, u32::MAX, 1));
    assert!(matches!(err, PageError::RangeOutsideSegment { .. }), "{err}");
    let err = refused(|b| set_range(b, 1, u64::MAX - 4095, 2, 1));
    assert!(matches!(err, PageError::RangeOutsideSegment { .. }), "gpa overflow must not panic: {err}");
    let err = refused(|b| set_range(b, 0, HIGHMEM_BASE, 2, 0));
    assert!(matches!(err, PageError::RangeOutsideSegment { .. }), "{err}");
}

#[test]
fn malformed_ranges_are_refused() {
    assert!(matches!(refused(|b| set_range(b, 1, 0x10001, 3, 1)), PageError::RangeUnaligned { index: 1, .. }));
    assert!(matches!(refused(|b| set_range(b, 1, 0x10000, 0, 1)), PageError::RangeEmpty { index: 1, .. }));
    assert!(matches!(refused(|b| set_range(b, 1, 0x10000, 3, 7)), PageError::RangeBadKind { kind: 7, .. }));
    let err = refused(|b| set_range(b, 1, 0x2000, 3, 1));
    assert_eq!(
        err.to_string(),
        "range 1 at gpa 0x2000 starts before the previous range ends at 0x3000; ranges must ascend without overlap"
    );
    let err = refused(|b| {
        b[40 + 16 + 13] = 1;
        reseal(b);
    });
    assert!(matches!(err, PageError::ReservedNotZero { .. }), "{err}");
}

#[test]
fn payload_length_must_match_the_data_ranges() {
    let err = refused(|b| {
        b[24..32].copy_from_slice(&(u64::MAX).to_le_bytes());
        reseal(b);
    });
    assert_eq!(err.to_string(), "page batch declares 18446744073709551615 payload bytes but its DATA ranges add up to 8192");
    // A ZERO range relabelled DATA would make the receiver read 3 more pages than were sent.
    let err = refused(|b| set_range(b, 1, 0x10000, 3, 0));
    assert!(matches!(err, PageError::PayloadLength { declared: 8192, expected: 20480 }), "{err}");
}

#[test]
fn a_batch_for_a_segment_this_guest_lacks_is_refused() {
    let err = refused(|b| {
        b[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        reseal(b);
    });
    assert_eq!(err.to_string(), "page batch is for a segment at gpa 0x1000, but no segment starts there");
}

/// A connected loopback TCP pair (sender, receiver) with 4 MiB buffers, as migration sockets to
/// another host have (so no memory pressure wakes a reader early); the receiver gives up after
/// `timeout`.
fn tcp_pair(timeout: std::time::Duration) -> (std::net::TcpStream, std::net::TcpStream) {
    let (tx, rx) = tcp_pair_with_buffers(4 << 20);
    rx.set_read_timeout(Some(timeout)).unwrap();
    (tx, rx)
}

/// A loopback TCP pair whose sender and receiver buffers are `size` bytes (no autotuning).
fn tcp_pair_with_buffers(size: libc::c_int) -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (rx, _) = listener.accept().unwrap();
    for (fd, opt) in [(tx.as_raw_fd(), libc::SO_SNDBUF), (rx.as_raw_fd(), libc::SO_RCVBUF)] {
        // SAFETY: the option value is a c_int on our stack, passed with its size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    (tx, rx)
}

/// The bytes `send_batch` writes for `ranges` of `mem`.
fn batch_bytes(mem: &GuestMemory, ranges: &[PageRange]) -> Vec<u8> {
    let (rx, tx) = socketpair();
    std::thread::scope(|s| {
        s.spawn(move || send_batch(tx.as_raw_fd(), mem, ranges).unwrap()); // tx closes when done
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(rx), &mut out).unwrap();
        out
    })
}

#[test]
fn over_tcp_the_reader_waits_for_whole_windows_and_then_for_single_bytes_again() {
    use std::io::{Read, Write};
    let (Some(src), Some(dst)) = (two_segment_guest(TrackingChoice::Soft), two_segment_guest(TrackingChoice::Soft)) else { return };
    for p in 0..700u64 {
        src.write(GuestAddress(HIGHMEM_BASE + p * 4096), &page_fill(p)).unwrap();
    }
    let (theirs, mine) = (DigestTracker::new(&src).unwrap(), DigestTracker::new(&dst).unwrap());
    let ranges = build_ranges_from_bitmap(&src.segments()[1], &harvest(&src, 1), true).unwrap();
    let (mut tx, mut rx) = tcp_pair(std::time::Duration::from_secs(20));
    std::thread::scope(|s| {
        s.spawn(|| {
            send_batch_tracked(tx.as_raw_fd(), &src, &ranges, Some(&theirs)).unwrap();
            tx.write_all(b"!").unwrap(); // a one-byte frame after the batch
        });
        recv_batch_tracked(rx.as_raw_fd(), &dst, Some(&mine)).unwrap();
        let mut lowat: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the c_int we own.
        let rc = unsafe {
            libc::getsockopt(rx.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&mut lowat as *mut libc::c_int).cast(), &mut len)
        };
        assert_eq!((rc, lowat), (0, 1), "the receiver must not wait for a window's worth of the frames after a batch");
        let mut one = [0u8; 1];
        rx.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"!");
    });
    assert_eq!(mine.digest().unwrap(), commit_digest(&src).unwrap());
    assert_eq!(theirs.digest().unwrap(), commit_digest(&src).unwrap());
}

#[test]
fn a_window_half_there_when_the_read_starts_still_completes_when_the_stream_then_pauses() {
    // The reader finds half of a window queued, and the rest comes only after a pause, with
    // nothing behind it: the sender then waits for an answer. A reader that copied the first half
    // and slept for a low-water mark of new bytes would wait forever here.
    use std::io::{Read, Write};
    let (Some(src), Some(dst)) = (two_segment_guest(TrackingChoice::Soft), two_segment_guest(TrackingChoice::Soft)) else { return };
    for p in 0..50u64 {
        src.write(GuestAddress(HIGHMEM_BASE + p * 4096), &page_fill(p)).unwrap();
    }
    let ranges = build_ranges_from_bitmap(&src.segments()[1], &harvest(&src, 1), true).unwrap();
    let bytes = batch_bytes(&src, &ranges);
    let half = bytes.len() / 2;
    // A stuck reader would sit until its own timeout (20 s); the sender gives up on the answer
    // well before that (3 s), which fails the test.
    let (mut tx, mut rx) = tcp_pair(std::time::Duration::from_secs(20));
    tx.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let tracker = DigestTracker::new(&dst).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            tx.write_all(&bytes[..half]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            tx.write_all(&bytes[half..]).unwrap();
            let mut answer = [0u8; 1];
            tx.read_exact(&mut answer).expect("the receiver answers once the batch is complete");
        });
        std::thread::sleep(std::time::Duration::from_millis(20)); // let the first half arrive
        recv_batch_tracked(rx.as_raw_fd(), &dst, Some(&tracker)).unwrap();
        rx.write_all(b"k").unwrap();
    });
    assert_eq!(tracker.digest().unwrap(), commit_digest(&src).unwrap());
}

#[test]
fn a_socket_that_goes_quiet_times_out_with_eagain() {
    use std::io::Write;
    let (Some(src), Some(dst)) = (two_segment_guest(TrackingChoice::Soft), two_segment_guest(TrackingChoice::Soft)) else { return };
    for p in 0..10u64 {
        src.write(GuestAddress(HIGHMEM_BASE + p * 4096), &page_fill(p)).unwrap();
    }
    let ranges = build_ranges_from_bitmap(&src.segments()[1], &harvest(&src, 1), true).unwrap();
    let bytes = batch_bytes(&src, &ranges);
    let (mut tx, rx) = tcp_pair(std::time::Duration::from_millis(200));
    tx.write_all(&bytes[..bytes.len() - 100]).unwrap(); // and then nothing, the connection open
    let err = recv_batch(rx.as_raw_fd(), &dst).unwrap_err();
    assert_eq!(err.errno(), libc::EAGAIN, "{err}");
    let peer = tx.local_addr().unwrap().to_string();
    match &err {
        PageError::TimedOut { direction: Direction::Receive, peer: Some(p), timeout, .. } => {
            assert_eq!((p, *timeout), (&peer, std::time::Duration::from_millis(200)));
        }
        other => panic!("expected a receive timeout, got {other}"),
    }
    assert!(err.to_string().contains(&format!("timed out: the peer {peer} sent nothing for 0.2 s")), "{err}");
    drop(tx);
}

#[test]
fn a_peer_that_takes_nothing_times_out_the_send_one_timeout_after_its_last_byte() {
    let Some(src) = two_segment_guest(TrackingChoice::Soft) else { return };
    let (tx, rx) = tcp_pair_with_buffers(64 << 10); // small: the sender fills them at once
    let timeout = std::time::Duration::from_secs(2);
    tx.set_write_timeout(Some(timeout)).unwrap();
    let ranges = [PageRange { gpa: GuestAddress(0), pages: 1024, kind: RangeKind::Data }]; // 4 MiB; rx never reads
    let start = std::time::Instant::now();
    let err = send_batch(tx.as_raw_fd(), &src, &ranges).unwrap_err();
    let took = start.elapsed();
    let peer = rx.local_addr().unwrap().to_string();
    match &err {
        PageError::TimedOut { direction: Direction::Send, peer: Some(p), timeout: t, .. } => assert_eq!((p, *t), (&peer, timeout)),
        other => panic!("expected a send timeout, got {other}"),
    }
    assert!(err.to_string().contains(&format!("timed out: the peer {peer} took nothing for 2 s")), "{err}");
    // A sleeping sendmsg that copied part of its bytes returns them only when its timeout runs
    // out, and the next call waits a whole timeout again: at least twice the timeout. Waiting
    // in poll() from the last byte taken gives up one timeout after it.
    assert!(took < 2 * timeout - std::time::Duration::from_millis(500), "gave up after {took:?}");
    drop(rx);
}

#[test]
fn a_slow_trickle_below_the_low_water_mark_is_not_a_timeout() {
    use std::io::Write;
    let (Some(src), Some(dst)) = (two_segment_guest(TrackingChoice::Soft), two_segment_guest(TrackingChoice::Soft)) else { return };
    for p in 0..64u64 {
        src.write(GuestAddress(p * 4096), &page_fill(p)).unwrap();
    }
    let ranges = build_ranges_from_bitmap(&src.segments()[0], &harvest(&src, 0), true).unwrap();
    let bytes = batch_bytes(&src, &ranges);
    // 1 s receive timeout; the bytes come in pieces 250 ms apart (1.5 s in all, longer than the
    // timeout), each far below the whole-window low-water mark: the peer is sending, so the
    // receive waits on. The gaps leave a loaded machine 750 ms of slack each.
    let (mut tx, rx) = tcp_pair(std::time::Duration::from_secs(1));
    let sender = std::thread::spawn(move || {
        let head = bytes.len() - 6 * 4096;
        tx.write_all(&bytes[..head]).unwrap();
        for piece in bytes[head..].chunks(4096) {
            std::thread::sleep(std::time::Duration::from_millis(250));
            tx.write_all(piece).unwrap();
        }
        tx
    });
    let got = recv_batch(rx.as_raw_fd(), &dst).unwrap();
    assert_eq!(got.data_pages, 64);
    drop(sender.join().unwrap());
}

/// Into memory already there (here a memfd, which is never installed into), a lone stream reads
/// 1 MiB windows and one of a round's several streams 2 MiB (`SHARED_RECV_WINDOW_PAGES`). Over
/// TCP, where the reader waits for whole windows, either ends with the source's bytes and
/// digest; cut inside a shared stream's second window, the receiver says exactly how much page
/// data came and wrote nothing past the cut.
#[test]
fn a_shared_stream_reads_two_mib_windows_and_a_cut_inside_one_is_exact() {
    use super::batch_io::WIDEST_READ;
    use super::fdio::{RECV_WINDOW_PAGES, SHARED_RECV_WINDOW_PAGES};
    use crate::memory::Backing;
    use std::io::Write;
    let memfd_guest = || {
        let mut opts = MemoryOptions::new(32 * MIB);
        opts.backing = Backing::Memfd;
        GuestMemory::new(&opts).unwrap()
    };
    let src = GuestMemory::new(&MemoryOptions::new(32 * MIB)).unwrap();
    for p in 0..6144u64 {
        src.write(GuestAddress(p * 4096), &page_fill(p)).unwrap();
    }
    let ranges = build_ranges_from_bitmap(&src.segments()[0], &harvest(&src, 0), true).unwrap();
    let bytes = &batch_bytes(&src, &ranges);
    let src = &src;
    let payload_at = bytes.len() - 6144 * 4096;
    for alone in [true, false] {
        let dst = memfd_guest();
        let tracker = DigestTracker::new(&dst).unwrap();
        let budget = PageBudget::new(8192);
        let (mut tx, rx) = tcp_pair(std::time::Duration::from_secs(20));
        let got = std::thread::scope(|s| {
            s.spawn(move || {
                tx.write_all(bytes).unwrap();
                send_batch(tx.as_raw_fd(), src, &[]).unwrap(); // the share's empty end batch
            });
            WIDEST_READ.with(|w| w.set(0));
            let got = recv_share(rx.as_raw_fd(), &dst, Some(&tracker), &budget, false, None, if alone { 1 } else { 2 }).unwrap();
            (got, WIDEST_READ.with(|w| w.get()))
        });
        // The measured windows, pinned: a change to either is a change to measure again.
        assert_eq!((RECV_WINDOW_PAGES * 4096, SHARED_RECV_WINDOW_PAGES * 4096), (1 << 20, 2 << 20));
        assert_eq!(got.1, if alone { MIB } else { 2 * MIB }, "alone: {alone}");
        assert_eq!(got.0.stats.data_pages, 6144);
        assert_eq!(dst.segments()[0].installed_pages(), 0, "a memfd is written, never installed into");
        assert_eq!(tracker.digest().unwrap(), commit_digest(src).unwrap(), "alone: {alone}");
        assert_eq!(commit_digest(&dst).unwrap(), commit_digest(src).unwrap(), "alone: {alone}");
    }
    // Cut 100 bytes into the page 3 MiB into the data: inside the second 2 MiB window (with a
    // tracker, as a migration's receiver has: without one, the payload is read as one window).
    let dst = memfd_guest();
    let tracker = DigestTracker::new(&dst).unwrap();
    let budget = PageBudget::new(8192);
    let cut = payload_at + (3 << 20) + 100;
    let (mut tx, rx) = tcp_pair(std::time::Duration::from_secs(20));
    let got = std::thread::scope(|s| {
        s.spawn(move || {
            tx.write_all(&bytes[..cut]).unwrap();
            drop(tx);
        });
        WIDEST_READ.with(|w| w.set(0));
        let got = recv_share(rx.as_raw_fd(), &dst, Some(&tracker), &budget, false, None, 2);
        assert_eq!(WIDEST_READ.with(|w| w.get()), 2 * MIB, "read in 2 MiB windows");
        got
    });
    match got {
        Err(PageError::Truncated { what: "page data", got, .. }) => assert_eq!(got, (3 << 20) + 100),
        other => panic!("expected a truncated batch, got {other:?}"),
    }
    // The windows before the cut's are in place; the cut window, read into the staging buffer a
    // tracker's reader puts windows in place from, is not (nor is anything past it).
    assert_eq!(read(&dst, (2 << 20) - 4096, 4096), page_fill(511), "the last page of the window before the cut's arrived");
    assert_eq!(read(&dst, 2 << 20, 4096), vec![0u8; 4096], "the cut window's first page was not put in place");
    assert_eq!(read(&dst, (3 << 20) - 4096, 4096), vec![0u8; 4096], "nor its last whole page before the cut");
    assert_eq!(read(&dst, (3 << 20) + 4096, 4096), vec![0u8; 4096], "nothing past the cut was written");
}

/// The low-water mark a socket reader sleeps on is at most its window, also where it reads a
/// whole payload at once (no tracker, no meter): a lone reader 1 MiB, one of several streams 2 MiB.
#[test]
fn a_reader_sleeps_for_at_most_its_window() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let src = GuestMemory::new(&MemoryOptions::new(8 * MIB)).unwrap();
    for p in 0..1024u64 {
        src.write(GuestAddress(p * 4096), &page_fill(p)).unwrap();
    }
    let ranges = build_ranges_from_bitmap(&src.segments()[0], &harvest(&src, 0), true).unwrap();
    let bytes = &batch_bytes(&src, &ranges);
    let (src, tracker) = (&src, DigestTracker::new(&src).unwrap());
    for (streams, tracked, most) in [(1, false, 1 << 20), (2, true, 2 << 20)] {
        let dst = {
            let mut opts = MemoryOptions::new(8 * MIB);
            opts.backing = crate::memory::Backing::Memfd;
            GuestMemory::new(&opts).unwrap()
        };
        let (mut tx, rx) = tcp_pair(Duration::from_secs(20));
        let fd = rx.as_raw_fd();
        let seen = std::thread::scope(|s| {
            s.spawn(move || {
                tx.write_all(&bytes[..200_000]).unwrap();
                std::thread::sleep(Duration::from_millis(600)); // the reader sleeps on its mark meanwhile
                tx.write_all(&bytes[200_000..]).unwrap();
                send_batch(tx.as_raw_fd(), src, &[]).unwrap();
            });
            let peek = s.spawn(move || {
                let (start, mut seen) = (Instant::now(), 1);
                while seen == 1 && start.elapsed() < Duration::from_millis(500) {
                    std::thread::sleep(Duration::from_millis(10));
                    let mut lowat: libc::c_int = 0;
                    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    // SAFETY: getsockopt writes at most `len` bytes into the c_int we own.
                    unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&mut lowat as *mut libc::c_int).cast(), &mut len) };
                    seen = lowat;
                }
                seen
            });
            let tracker = tracked.then_some(&tracker);
            recv_share(fd, &dst, tracker, &PageBudget::new(2048), false, None, streams).unwrap();
            peek.join().unwrap()
        });
        assert!(seen > 1 && seen <= most, "{streams} stream(s): the reader slept on a mark of {seen} bytes (at most {most})");
        assert_eq!(commit_digest(&dst).unwrap(), commit_digest(src).unwrap());
    }
}
