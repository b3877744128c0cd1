//! Tests of parallel streams: a round sent over several fds arrives bit-exact, each fd's share
//! ended by an empty batch; a stream that fails names itself.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::memory::{GuestAddress, GuestMemory, MemoryOptions, PAGE_SIZE};
use crate::progress::Meter;
use crate::wire::{build_ranges_from_bitmap, send_batch, split_batches, CompressMode, Compressor, PageRange};

const MIB: u64 = 1 << 20;
/// Turns that do not open for slowness within these tests: long enough never to, short enough that
/// a turn never given back fails a test (the turns open, which it checks) instead of hanging it.
const LONG: std::time::Duration = std::time::Duration::from_secs(30);

thread_local! {
    /// The most streams the last `send_chunks_compressed` of this thread had writing a chunk at once.
    pub(super) static MOST_WRITING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Whether the turns of the last `send_chunks_compressed` of this thread opened for slowness.
    pub(super) static OPENED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The round (its chunks' address, unique while a test holds them, so tests running at once do
/// not meet it) and the chunk whose sending thread panics as it takes it.
static PANIC_AT: std::sync::Mutex<Option<(usize, usize)>> = std::sync::Mutex::new(None);

/// Panics asked for by a test take longer to report than `SLOW_TURNS`, as a backtrace printed by
/// the process's hook (RUST_BACKTRACE) can: the hook that marks the round failed must run before
/// that, or the turns open and the other streams go on. Installed once, around whatever hook is
/// there; the streams' own marking runs first either way (installed earlier, it is the hook this
/// one calls before sleeping; installed later, it wraps this one).
fn slow_to_report_asked_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            before(info);
            if info.payload_as_str().is_some_and(|m| m.ends_with("a panic asked for by the test")) {
                std::thread::sleep(3 * SLOW_TURNS);
            }
        }));
    });
}

pub(super) fn panic_if_asked(chunks: &[Vec<PageRange>], i: usize) {
    if *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) == Some((chunks.as_ptr() as usize, i)) {
        panic!("chunk {i}: a panic asked for by the test");
    }
}

/// A stream writing a chunk in `send_chunks_compressed`: panics (failing that stream, so the
/// round) when more than `at_once` are, unless the turns were opened to all.
pub(super) struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    pub(super) fn count(sending: &'a AtomicUsize, most: &AtomicUsize, at_once: usize, turns: &Turns) -> Writing<'a> {
        let now = sending.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
        assert!(now <= at_once || turns.open(), "{now} streams writing a chunk at once, {at_once} allowed");
        Writing(sending)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn guest(size: u64) -> GuestMemory {
    GuestMemory::new(&MemoryOptions::new(size)).unwrap()
}

/// The dirty pages of `src`'s first segment as ranges (zero pages found), its dirty bits cleared.
fn dirty_ranges(src: &GuestMemory) -> Vec<PageRange> {
    let seg = &src.segments()[0];
    let mut words = vec![0u64; seg.pages().div_ceil(64)];
    src.get_and_clear_dirty_segment(0, &mut words).unwrap();
    build_ranges_from_bitmap(seg, &words, true).unwrap()
}

/// A guest of `size` whose first `pages` pages each hold a byte of their own (none zero), and an
/// empty guest of the same size to receive them.
fn source_and_empty(size: u64, pages: u64) -> (GuestMemory, GuestMemory) {
    let src = guest(size);
    for p in 0..pages {
        src.write(GuestAddress(p * 4096), &[(p % 251) as u8 + 1; 4096]).unwrap();
    }
    (src, guest(size))
}

/// A thread reading `fd` to its end and dropping what it reads; it returns how many bytes it read.
fn drain(fd: OwnedFd) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                return total;
            }
            total += n as u64;
        }
    })
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fresh fds into the array we own.
    assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn a_round_over_three_streams_arrives_exactly() {
    let src = guest(16 * MIB);
    let dst = guest(16 * MIB);
    for p in (0..4096u64).filter(|p| p % 3 != 1) {
        let fill = if p % 7 == 0 { [0u8; 4096] } else { [(p % 251) as u8 + 1; 4096] };
        src.write(GuestAddress(p * 4096), &fill).unwrap();
    }
    let seg = &src.segments()[0];
    let mut words = vec![0u64; seg.pages().div_ceil(64)];
    src.get_and_clear_dirty_segment(0, &mut words).unwrap();
    let ranges = build_ranges_from_bitmap(seg, &words, true).unwrap();
    let chunks = split_batches(&ranges, 64);
    let pairs: Vec<_> = (0..3).map(|_| socketpair()).collect();
    let send_fds: Vec<_> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
    let budget = PageBudget::new(dst.segments()[0].pages() as u64);
    let (sent_meter, received_meter) = (Meter::new(), Meter::new());
    let received = std::thread::scope(|scope| {
        let readers: Vec<_> = pairs
            .iter()
            .map(|(_, b)| {
                let (fd, dst, budget, meter) = (b.as_raw_fd(), &dst, &budget, &received_meter);
                scope.spawn(move || recv_share(fd, dst, None, budget, false, Some(meter), 3).unwrap())
            })
            .collect();
        let sent = send_chunks(&send_fds, &src, &chunks, None, Some(&sent_meter)).unwrap();
        let got: Vec<_> = readers.into_iter().map(|h| h.join().unwrap()).collect();
        let end = crate::wire::BATCH_HEADER_SIZE as u64; // each share's end marker, counted by the receiver
        for (s, g) in sent.iter().zip(&got) {
            assert_eq!((s.batches, s.stats.data_pages, s.stats.zero_pages), (g.batches, g.stats.data_pages, g.stats.zero_pages));
            assert_eq!(s.stats.wire_bytes + end, g.stats.wire_bytes);
        }
        got
    });
    assert_eq!(budget.carried(), ranges.iter().map(|r| r.pages as u64).sum::<u64>());
    let total: u64 = received.iter().map(|t| t.stats.data_pages + t.stats.zero_pages).sum();
    assert_eq!(total, ranges.iter().map(|r| r.pages as u64).sum::<u64>());
    assert!(received.iter().filter(|t| t.batches > 0).count() >= 2, "the chunks were shared out: {received:?}");
    // Both meters end where the totals do: every page counted once, every byte on the wire.
    let data: u64 = received.iter().map(|t| t.stats.data_pages).sum();
    let wire: u64 = received.iter().map(|t| t.stats.wire_bytes).sum();
    let (s, r) = (sent_meter.read(), received_meter.read());
    assert_eq!((s.pages_total, s.data_pages_total, s.pages_done, s.data_pages_done), (total, data, total, data));
    assert_eq!((r.pages_done, r.data_pages_done, r.bytes_done), (total, data, wire));
    assert_eq!(s.bytes_done, wire, "the sender counts its end markers too");
    let (mut a, mut b) = (vec![0u8; 16 * MIB as usize], vec![0u8; 16 * MIB as usize]);
    src.read(GuestAddress(0), &mut a).unwrap();
    dst.read(GuestAddress(0), &mut b).unwrap();
    assert!(a == b, "destination memory differs");
}

#[test]
fn a_closed_stream_fails_the_round_and_names_it() {
    let src = guest(4 * MIB);
    src.write(GuestAddress(0), &vec![5u8; 4 * MIB as usize]).unwrap();
    let chunks = split_batches(&dirty_ranges(&src), 16);
    let (a0, b0) = socketpair();
    let (a1, b1) = socketpair();
    drop(b1); // stream 1's peer is gone
    let drain = drain(b0);
    let err = send_chunks(&[a0.as_raw_fd(), a1.as_raw_fd()], &src, &chunks, None, None).unwrap_err();
    assert!(err.to_string().starts_with("stream 1: "), "{err}");
    assert_eq!(err.errno(), libc::EPIPE);
    drop(a0);
    drain.join().unwrap();
    assert!(send_chunks::<std::os::fd::RawFd>(&[], &src, &chunks, None, None).is_err());
}

/// A round's share refused for what its receiver did not agree to: more pages than the budget
/// over all streams, a compressed batch on a plain stream. Each error says which.
#[test]
fn a_share_over_budget_or_compressed_without_agreement_is_refused() {
    let src = guest(4 * MIB);
    src.write(GuestAddress(0), &vec![b'a'; 16 * 4096]).unwrap();
    let dst = guest(4 * MIB);
    // 64 KiB of pages: the whole share fits the socket's buffer, so it is sent before it is read.
    let ranges = vec![PageRange { gpa: GuestAddress(0), pages: 16, kind: crate::wire::RangeKind::Data }];
    let send = |mode: CompressMode| {
        let (a, b) = socketpair();
        let mut c = Compressor::new(mode, None);
        c.send_ranges(a.as_raw_fd(), &src, &ranges, None, |_| {}).unwrap();
        send_batch(a.as_raw_fd(), &src, &[]).unwrap();
        b
    };
    let b = send(CompressMode::Off);
    let budget = PageBudget::new(50);
    budget.charge(40).unwrap(); // another stream's share
    let err = recv_share(b.as_raw_fd(), &dst, None, &budget, false, None, 1).unwrap_err();
    assert_eq!(err.to_string(), "the round carried more pages (56) than the guest has (50)");
    assert_eq!(err.errno(), libc::EBADMSG);
    let b = send(CompressMode::Lz4);
    let err = recv_share(b.as_raw_fd(), &dst, None, &PageBudget::new(1000), false, None, 1).unwrap_err();
    assert!(matches!(err, PageError::CompressionNotAgreed), "{err}");
    // Refused unread: the block never reached the decompressor, no guest byte was written.
    let mut page = vec![0xFFu8; 16 * 4096];
    dst.read(GuestAddress(0), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "a refused batch wrote guest memory");
    let b = send(CompressMode::Lz4);
    let got = recv_share(b.as_raw_fd(), &dst, None, &PageBudget::new(1000), true, None, 1).unwrap();
    assert_eq!((got.batches, got.stats.data_pages, got.stats.compressed_batches), (1, 16, 1));
}

/// 24 MiB of pages, with a zero run, sent as one stream's share with the sender hashing.
fn big_share(src: &GuestMemory) -> Vec<Vec<PageRange>> {
    for p in 0..6144u64 {
        let fill = if (1000..1100).contains(&p) { [0u8; 4096] } else { [(p % 253) as u8 + 1; 4096] };
        src.write(GuestAddress(p * 4096), &fill).unwrap();
    }
    let seg = &src.segments()[0];
    let mut words = vec![0u64; seg.pages().div_ceil(64)];
    src.get_and_clear_dirty_segment(0, &mut words).unwrap();
    split_batches(&build_ranges_from_bitmap(seg, &words, true).unwrap(), crate::wire::BATCH_DATA_PAGES)
}

/// A lone stream's big batches into fresh memory are installed in a pipeline (a second thread
/// installs and hashes one MiB while the first reads the next); one of several streams installs
/// on its own thread. Either way the destination ends with the source's bytes and its commit
/// digest, every DATA page installed fresh and counted once by the meter.
#[test]
fn a_lone_stream_installs_big_batches_in_a_pipeline_and_ends_exact() {
    use crate::digest::{commit_digest, DigestTracker};
    let src = guest(32 * MIB);
    let chunks = big_share(&src);
    let data: u64 = chunks.iter().flatten().filter(|r| r.kind == crate::wire::RangeKind::Data).map(|r| r.pages as u64).sum();
    assert_eq!(data, 6044);
    // A lone stream pipelines with one installer and with two (windows then land out of
    // order); one of 2 streams installs 1 MiB at a time (on 2 CPUs or more), one of 16 (more
    // streams than CPUs on most hosts) 512 KiB.
    for (streams, installers) in [(1, 1), (1, 2), (2, 1), (MAX_STREAMS, 1)] {
        let alone = streams == 1;
        let dst = guest(32 * MIB);
        dst.segments()[0].set_receives_huge(false); // the installers, not huge pages (tested below)
        let tracker = DigestTracker::new(&dst).unwrap();
        let meter = Meter::new();
        let (a, b) = socketpair();
        let budget = PageBudget::new(dst.segments()[0].pages() as u64);
        let (got, pipelined) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                crate::wire::batch_io::FORCE_INSTALLERS.with(|n| n.set(Some(installers)));
                let got = recv_share(b.as_raw_fd(), &dst, Some(&tracker), &budget, false, Some(&meter), streams);
                (got, crate::wire::batch_io::PIPELINED.with(|n| n.get()))
            });
            send_chunks(&[a.as_raw_fd()], &src, &chunks, None, None).unwrap();
            reader.join().unwrap()
        });
        let got = got.unwrap();
        assert_eq!(got.stats.data_pages, data);
        // Where this kernel refuses userfaultfd, pages are written plainly (and never pipelined).
        let installs = dst.segments()[0].install_refused().is_none();
        let case = format!("streams: {streams}, installers: {installers}");
        assert_eq!(pipelined, if alone && installs { 2 } else { 0 }, "{case}");
        if installs {
            assert_eq!(dst.segments()[0].installed_pages(), data, "{case}");
        }
        assert_eq!(meter.read().data_pages_done, data, "{case}");
        assert_eq!(tracker.digest().unwrap(), commit_digest(&src).unwrap(), "{case}");
        assert_eq!(commit_digest(&dst).unwrap(), commit_digest(&src).unwrap(), "{case}");
    }
}

/// Memory populated while the destination waited (`GuestMemory::start_prefault`) is read straight
/// into place: a big batch whose every page is there is neither pipelined through the installers
/// (each install would be refused page by page) nor advised for huge pages, and ends exact.
#[test]
fn batches_into_memory_populated_ahead_are_read_straight_into_place_and_end_exact() {
    use crate::digest::{commit_digest, DigestTracker};
    let src = guest(32 * MIB);
    let chunks = big_share(&src);
    for receives_huge in [false, true] {
        let dst = guest(32 * MIB);
        dst.segments()[0].set_receives_huge(receives_huge);
        assert_eq!(dst.start_prefault().unwrap(), 32 * MIB);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !dst.segments()[0].all_resident(&[(0, 32 * MIB as usize / 4096)]) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(dst.stop_prefault().unwrap().bytes, 32 * MIB);
        let tracker = DigestTracker::new(&dst).unwrap();
        let (a, b) = socketpair();
        let budget = PageBudget::new(dst.segments()[0].pages() as u64);
        let (got, pipelined) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let got = recv_share(b.as_raw_fd(), &dst, Some(&tracker), &budget, false, None, 1);
                (got, crate::wire::batch_io::PIPELINED.with(|n| n.get()))
            });
            send_chunks(&[a.as_raw_fd()], &src, &chunks, None, None).unwrap();
            reader.join().unwrap()
        });
        assert_eq!(got.unwrap().stats.data_pages, 6044);
        let seg = &dst.segments()[0];
        assert_eq!((pipelined, seg.installed_pages(), seg.huge_received_pages()), (0, 0, 0), "huge: {receives_huge}");
        assert_eq!(tracker.digest().unwrap(), commit_digest(&src).unwrap());
        assert_eq!(commit_digest(&dst).unwrap(), commit_digest(&src).unwrap());
    }
}

/// The field lines (`AnonHugePages: ...`, `VmFlags: ...`) of every mapping in /proc/self/smaps
/// that overlaps `start..start+len`.
fn smaps_fields(start: usize, len: usize) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut inside, mut fields) = (false, Vec::new());
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|(lo, _)| lo.chars().all(|c| c.is_ascii_hexdigit())) {
            let (lo, hi) = (usize::from_str_radix(lo, 16).unwrap(), usize::from_str_radix(hi, 16).unwrap());
            inside = lo < start + len && start < hi;
        } else if inside {
            fields.push(line.to_string());
        }
    }
    fields
}

/// Bytes of `start..start+len` this process holds on transparent huge pages.
fn anon_huge_bytes(start: usize, len: usize) -> u64 {
    let kib = smaps_fields(start, len)
        .iter()
        .filter_map(|f| f.strip_prefix("AnonHugePages:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap())
        .sum::<u64>();
    kib << 10
}

/// A stream's page data that fills whole 2 MiB regions goes onto transparent huge pages, read
/// straight into place (no userfaultfd, no pipeline), as the lone stream of a round and as one
/// of two: the destination ends with the source's bytes and its commit digest, every DATA page
/// counted once by the meter; only regions a batch fills whole are advised (none holding the
/// zero run, none split between two batches), so the destination holds exactly the pages that
/// came; and afterwards no part of the mapping is left advised for huge pages (later first
/// touches, the guest's, take small ones).
#[test]
fn whole_regions_of_received_pages_go_onto_huge_pages_and_end_exact() {
    use crate::digest::{commit_digest, DigestTracker};
    const REGION: usize = 512; // pages
    let src = guest(32 * MIB);
    let chunks = big_share(&src);
    let data: u64 = chunks.iter().flatten().filter(|r| r.kind == crate::wire::RangeKind::Data).map(|r| r.pages as u64).sum();
    // The regions each batch fills whole with DATA pages, counted from the batches themselves.
    let mut whole_regions = 0;
    for chunk in &chunks {
        let mut pages = std::collections::BTreeSet::new();
        for r in chunk.iter().filter(|r| r.kind == crate::wire::RangeKind::Data) {
            pages.extend(r.gpa.0 as usize / PAGE_SIZE..r.gpa.0 as usize / PAGE_SIZE + r.pages as usize);
        }
        whole_regions +=
            (0..32 * MIB as usize / PAGE_SIZE / REGION).filter(|k| (k * REGION..(k + 1) * REGION).all(|p| pages.contains(&p))).count();
    }
    assert!(whole_regions >= 8, "the share has whole regions to advise ({whole_regions})");
    for streams in [1, 2] {
        let dst = guest(32 * MIB);
        let seg = &dst.segments()[0];
        if !seg.receives_huge() {
            eprintln!("skipped: this host offers no transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled)");
            return;
        }
        let tracker = DigestTracker::new(&dst).unwrap();
        let meter = Meter::new();
        let (a, b) = socketpair();
        let budget = PageBudget::new(seg.pages() as u64);
        let (got, pipelined) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let got = recv_share(b.as_raw_fd(), &dst, Some(&tracker), &budget, false, Some(&meter), streams);
                (got, crate::wire::batch_io::PIPELINED.with(|n| n.get()))
            });
            send_chunks(&[a.as_raw_fd()], &src, &chunks, None, None).unwrap();
            reader.join().unwrap()
        });
        let case = format!("streams: {streams}");
        assert_eq!(got.unwrap().stats.data_pages, data, "{case}");
        assert_eq!((pipelined, seg.installed_pages()), (0, 0), "read straight into place, not installed ({case})");
        // Counted before anything reads the memory (a read of an untouched page maps one).
        let resident = |seg: &crate::memory::Segment| seg.resident().unwrap().into_iter().filter(|&p| p).count() as u64;
        assert_eq!(resident(seg), data, "exactly the pages that came are there ({case})");
        let base = seg.as_ptr() as usize;
        assert_eq!(
            smaps_fields(base, seg.size()).iter().filter(|f| f.starts_with("VmFlags:") && f.contains(" hg")).count(),
            0,
            "advised back to small pages ({case})"
        );
        assert_eq!(meter.read().data_pages_done, data, "{case}");
        assert_eq!(tracker.digest().unwrap(), commit_digest(&src).unwrap(), "{case}");
        assert_eq!(commit_digest(&dst).unwrap(), commit_digest(&src).unwrap(), "{case}");
        if base.is_multiple_of(REGION * PAGE_SIZE) {
            assert_eq!(seg.huge_received_pages(), (whole_regions * REGION) as u64, "{case}");
        } else {
            // The mapping's regions are not the guest's: fewer of them lie whole in a batch.
            assert!(seg.huge_received_pages().is_multiple_of(REGION as u64) && seg.huge_received_pages() <= data, "{case}");
        }
        let huge = anon_huge_bytes(base, seg.size());
        assert!(huge > 0 && huge <= seg.huge_received_pages() * PAGE_SIZE as u64, "{huge} bytes on huge pages ({case})");
    }
}

/// Where the destination's population ahead timed small pages cheaper than huge ones (a VM whose
/// host took its free 2 MiB blocks back; `memory::prefault`), received page data follows it:
/// the same share is installed page by page instead of being advised for huge pages, and ends
/// exact; where huge pages came cheaper, they are taken.
#[test]
fn received_pages_go_on_small_pages_where_the_population_timed_them_cheaper() {
    use crate::digest::{commit_digest, DigestTracker};
    let src = guest(32 * MIB);
    let chunks = big_share(&src);
    for huge_cheaper in [false, true] {
        let dst = guest(32 * MIB);
        let seg = &dst.segments()[0];
        if !seg.receives_huge() {
            eprintln!("skipped: this host offers no transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled)");
            return;
        }
        seg.set_huge_cheaper(huge_cheaper);
        let tracker = DigestTracker::new(&dst).unwrap();
        let (a, b) = socketpair();
        let budget = PageBudget::new(seg.pages() as u64);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| recv_share(b.as_raw_fd(), &dst, Some(&tracker), &budget, false, None, 1));
            send_chunks(&[a.as_raw_fd()], &src, &chunks, None, None).unwrap();
            assert_eq!(reader.join().unwrap().unwrap().stats.data_pages, 6044);
        });
        if huge_cheaper {
            assert!(seg.huge_received_pages() > 0, "huge pages where they came cheaper");
        } else {
            assert_eq!(seg.huge_received_pages(), 0, "no region advised where small pages came cheaper");
            assert!(seg.installed_pages() > 0 || seg.install_refused().is_some(), "installed instead");
        }
        assert_eq!(tracker.digest().unwrap(), commit_digest(&src).unwrap(), "huge cheaper: {huge_cheaper}");
        assert_eq!(commit_digest(&dst).unwrap(), commit_digest(&src).unwrap(), "huge cheaper: {huge_cheaper}");
    }
}

/// The install window of a batch that is not pipelined: the sender's hash window for a lone
/// stream (its big batches pipeline in 1 MiB slots instead) and where streams outnumber the
/// CPUs; 1 MiB for one of several streams with a CPU each.
#[test]
fn install_windows_follow_the_streams_per_cpu() {
    use crate::wire::batch_io::install_window_pages;
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(install_window_pages(1), 128);
    assert_eq!(install_window_pages(cpus + 1), 128);
    if cpus >= 2 {
        assert_eq!(install_window_pages(2), 256);
        assert_eq!(install_window_pages(cpus), 256);
    }
}

/// A stream cut in the middle of a pipelined batch, with one installer and with two: the
/// receiver says how much page data came and stops all its threads (no hang); every page of the
/// whole slots before the cut holds the source's bytes, and nothing past the cut was written.
#[test]
fn a_stream_cut_inside_a_pipelined_batch_is_truncated_and_stops() {
    let src = guest(32 * MIB);
    let chunks = big_share(&src);
    let mut bytes = Vec::new();
    {
        let (x, y) = socketpair();
        let collect = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                // SAFETY: reading into a buffer we own.
                let n = unsafe { libc::read(y.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if n <= 0 {
                    return out;
                }
                out.extend_from_slice(&buf[..n as usize]);
            }
        });
        send_batch(x.as_raw_fd(), &src, &chunks[0]).unwrap();
        drop(x);
        bytes.extend(collect.join().unwrap());
    }
    // The first batch's header, table and 5.5 MiB of its page data, then the end of the stream.
    let table = crate::wire::BATCH_HEADER_SIZE + chunks[0].len() * 16;
    let cut = table + (11 << 19);
    for installers in [1, 2] {
        let dst = guest(32 * MIB);
        dst.segments()[0].set_receives_huge(false);
        let (a, b) = socketpair();
        let budget = PageBudget::new(dst.segments()[0].pages() as u64);
        let (got, pipelined) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                crate::wire::batch_io::FORCE_INSTALLERS.with(|n| n.set(Some(installers)));
                let got = recv_share(b.as_raw_fd(), &dst, None, &budget, false, None, 1);
                (got, crate::wire::batch_io::PIPELINED.with(|n| n.get()))
            });
            let mut at = 0;
            while at < cut {
                // SAFETY: writing from a buffer we own.
                let n = unsafe { libc::write(a.as_raw_fd(), bytes[at..cut].as_ptr() as *const libc::c_void, cut - at) };
                assert!(n > 0);
                at += n as usize;
            }
            drop(a);
            reader.join().unwrap()
        });
        match got {
            Err(PageError::Truncated { what: "page data", got, .. }) => assert_eq!(got, 11 << 19, "installers: {installers}"),
            other => panic!("expected a truncated batch with {installers} installers, got {other:?}"),
        }
        let installs = dst.segments()[0].install_refused().is_none();
        assert_eq!(pipelined, u64::from(installs), "the cut batch went through the pipeline");
        // The big share's page data begins at page 0: the 5 whole 1 MiB slots before the cut
        // were installed, whichever installer took them.
        let (mut want, mut have) = (vec![0u8; 5 << 20], vec![0u8; 5 << 20]);
        src.read(GuestAddress(0), &mut want).unwrap();
        dst.read(GuestAddress(0), &mut have).unwrap();
        assert!(want == have, "a whole slot before the cut differs (installers: {installers})");
        let mut past = vec![0u8; 4096];
        dst.read(GuestAddress(12 << 20), &mut past).unwrap();
        assert_eq!(past, vec![0u8; 4096], "nothing past the cut was written (installers: {installers})");
    }
}

/// An install thread failing (here: a tracker that has no such segment) stops the reader and the
/// other installers too, with one installer and with two: its error is returned, nothing hangs,
/// and the reader has not read on to the end.
#[test]
fn an_install_failure_inside_a_pipelined_batch_is_returned_and_stops_the_reader() {
    use crate::digest::DigestTracker;
    let layout = |size| {
        let mut opts = MemoryOptions::new(size);
        opts.lowmem_limit = 4 * MIB;
        GuestMemory::new(&opts).unwrap()
    };
    let (src, dst) = (layout(32 * MIB), layout(32 * MIB));
    dst.segments()[1].set_receives_huge(false);
    let high = dst.segments()[1].gpa();
    src.write(high, &vec![7u8; 24 * MIB as usize]).unwrap();
    let seg = &src.segments()[1];
    let mut words = vec![0u64; seg.pages().div_ceil(64)];
    src.get_and_clear_dirty_segment(1, &mut words).unwrap();
    let chunks = split_batches(&build_ranges_from_bitmap(seg, &words, true).unwrap(), crate::wire::BATCH_DATA_PAGES);
    let lowmem_only = guest(4 * MIB);
    let tracker = DigestTracker::new(&lowmem_only).unwrap(); // knows no highmem segment
    for installers in [1, 2] {
        let (a, b) = socketpair();
        let budget = PageBudget::new(dst.segments()[1].pages() as u64);
        let (got, sent) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let b = b; // closed when the reader is done, so a sender it stopped reading from fails
                crate::wire::batch_io::FORCE_INSTALLERS.with(|n| n.set(Some(installers)));
                recv_share(b.as_raw_fd(), &dst, Some(&tracker), &budget, false, None, 1)
            });
            let sent = send_chunks(&[a.as_raw_fd()], &src, &chunks, None, None);
            (reader.join().unwrap(), sent)
        });
        let err = got.unwrap_err();
        if dst.segments()[1].install_refused().is_some() {
            return; // written on one thread: the same error, from the only thread
        }
        assert!(
            matches!(err, PageError::NoSuchSegment { gpa } if gpa == high),
            "expected an install thread's error with {installers} installers, got {err}"
        );
        // 24 MiB do not fit a socket's buffer: the sender can only fail if the reader stopped early.
        assert!(sent.is_err(), "the reader read on to the end after an installer failed ({installers} installers)");
    }
}

#[test]
fn turns_let_at_once_streams_hold_one_and_the_next_wait() {
    let turns = Turns::new(2, LONG);
    let first = turns.take();
    let second = turns.take(); // a second turn while the first is held: does not wait
    let third_got = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let t = turns.take();
            third_got.store(true, Ordering::SeqCst);
            t
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!third_got.load(Ordering::SeqCst), "a third turn was granted while two were held");
        drop(second);
        let third = waiter.join().unwrap();
        assert!(third_got.load(Ordering::SeqCst));
        drop((first, third));
    });
    let state = turns.lock();
    assert_eq!((state.tickets, state.returned, state.open), (3, 3, false), "every turn given back");
}

#[test]
fn a_stream_past_at_once_stands_down_once_enough_went_and_goes_if_the_turns_open_first() {
    let turns = Turns::new(1, LONG);
    let held = turns.take();
    let enough = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let asked = scope.spawn(|| turns.stands_down(|| enough.load(Ordering::SeqCst)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!asked.is_finished(), "it decided before anything went or the turns opened");
        drop(held);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!asked.is_finished(), "a turn came back, not enough went, and yet it decided");
        enough.store(true, Ordering::SeqCst);
        drop(turns.take()); // the next turn given back wakes it to look again
        assert!(asked.join().unwrap(), "enough went quickly, yet it did not stand down");
    });
    // No turn comes back within the slow limit: the chunks wait on a network, and it goes.
    let slow = Turns::new(1, std::time::Duration::from_millis(50));
    let _stuck = slow.take();
    assert!(!slow.stands_down(|| false), "it stood down although the turns opened for slowness");
    assert!(slow.open());
}

#[test]
fn turns_go_in_the_order_they_were_asked_for() {
    // One turn at a time. This thread holds it while another asks; this thread then gives it
    // back and asks again at once: it must wait for the other's turn, not take its own again.
    let turns = Turns::new(1, LONG);
    let held = turns.take();
    let other_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _t = turns.take();
            std::thread::sleep(std::time::Duration::from_millis(50));
            other_done.store(true, Ordering::SeqCst);
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while turns.lock().tickets < 2 {
            assert!(std::time::Instant::now() < deadline, "the other thread never asked");
            std::thread::yield_now();
        }
        drop(held);
        let _again = turns.take();
        assert!(other_done.load(Ordering::SeqCst), "this thread took the turn again ahead of the one that asked first");
    });
}

/// A round over four streams, at most `at_once` of them writing a batch at a time: what each
/// carried, whether the destination's memory is the source's, and whether the turns opened.
fn four_streams_at_once(at_once: usize) -> (Vec<BatchTotals>, bool, bool) {
    let (src, dst) = source_and_empty(16 * MIB, 4096);
    let chunks = split_batches(&dirty_ranges(&src), 64);
    let pairs: Vec<_> = (0..4).map(|_| socketpair()).collect();
    let send_fds: Vec<_> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
    let budget = PageBudget::new(dst.segments()[0].pages() as u64);
    let how = Sending { at_once, ..Sending::all(4) };
    let sent = std::thread::scope(|scope| {
        let readers: Vec<_> = pairs
            .iter()
            .map(|(_, b)| {
                let (fd, dst, budget) = (b.as_raw_fd(), &dst, &budget);
                scope.spawn(move || recv_share(fd, dst, None, budget, false, None, 4))
            })
            .collect();
        let sent = send_chunks_compressed(&send_fds, &src, &chunks, None, None, how);
        if sent.is_err() {
            // Readers of the streams that sent no end marker would wait for one: end them.
            for fd in &send_fds {
                // SAFETY: shutting down a socket we own; it stays open.
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
        }
        let received: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        let Ok(sent) = sent else { panic!("at_once {at_once}: the round failed: {}", sent.err().unwrap()) };
        for (s, r) in sent.iter().zip(received) {
            assert_eq!(s.0.stats.data_pages, r.unwrap().stats.data_pages);
        }
        sent
    });
    let (mut a, mut b) = (vec![0u8; 16 * MIB as usize], vec![0u8; 16 * MIB as usize]);
    src.read(GuestAddress(0), &mut a).unwrap();
    dst.read(GuestAddress(0), &mut b).unwrap();
    (sent.into_iter().map(|(t, _)| t).collect(), a == b, OPENED.with(|o| o.get()))
}

#[test]
fn streams_taking_turns_carry_a_round_exactly_and_the_first_at_once_carry_all_of_it() {
    for at_once in [1, 2, 4, 16] {
        let (sent, same, opened) = four_streams_at_once(at_once);
        assert!(same, "at_once {at_once}: destination memory differs");
        assert_eq!(sent.iter().map(|t| t.stats.data_pages).sum::<u64>(), 4096, "at_once {at_once}");
        // Turns go in the order asked, so none of the first `at_once` streams is starved of
        // chunks (64 of them here); the others stand down once every chunk of this 16 MiB round
        // is taken, unless the turns opened for slowness first (a host too busy to move a chunk
        // in SLOW_TURNS).
        let carrying = at_once.min(4);
        assert!(sent[..carrying].iter().all(|t| t.batches > 0), "at_once {at_once}: a stream carried nothing: {sent:?}");
        if !opened {
            assert!(sent[carrying..].iter().all(|t| t.batches == 0), "at_once {at_once}: a stream past it carried chunks: {sent:?}");
        }
    }
}

#[test]
fn streams_taking_turns_fail_on_a_closed_stream_and_refuse_none_at_once() {
    let src = guest(4 * MIB);
    src.write(GuestAddress(0), &vec![5u8; 4 * MIB as usize]).unwrap();
    let chunks = split_batches(&dirty_ranges(&src), 16);
    let (a0, b0) = socketpair();
    let (a1, b1) = socketpair();
    let (a2, b2) = socketpair();
    drop(b1); // stream 1's peer is gone: it stands down and fails on its end marker
    let drains = [drain(b0), drain(b2)];
    let fds = [a0.as_raw_fd(), a1.as_raw_fd(), a2.as_raw_fd()];
    let how = Sending { at_once: 1, ..Sending::all(3) };
    let Err(err) = send_chunks_compressed(&fds, &src, &chunks, None, None, how) else { panic!("the round went through a closed stream") };
    assert!(err.to_string().starts_with("stream 1: "), "{err}");
    let Err(none) = send_chunks_compressed(&fds, &src, &chunks, None, None, Sending { at_once: 0, ..how }) else {
        panic!("a round went with no stream allowed to send")
    };
    assert!(none.to_string().contains("at least 1"), "{none}");
    drop((a0, a1, a2));
    for d in drains {
        d.join().unwrap();
    }
}

#[test]
fn a_stream_whose_thread_panics_fails_the_round_and_the_others_take_no_more_chunks() {
    let src = guest(8 * MIB);
    src.write(GuestAddress(0), &vec![7u8; 8 * MIB as usize]).unwrap();
    let chunks = split_batches(&dirty_ranges(&src), 16); // 128 chunks of 64 KiB
    let pairs: Vec<_> = (0..4).map(|_| socketpair()).collect();
    let fds: Vec<_> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
    let (sends, peers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let drains: Vec<_> = peers.into_iter().map(drain).collect();
    // One turn at a time: chunks 0-3 go before the one that panics, and none may go after it.
    // (Were the turns to open for slowness, at most the three other streams' chunks could be
    // going with it.)
    slow_to_report_asked_panics();
    *PANIC_AT.lock().unwrap() = Some((chunks.as_ptr() as usize, 4));
    let sent = send_chunks_compressed(&fds, &src, &chunks, None, None, Sending { at_once: 1, ..Sending::all(4) });
    *PANIC_AT.lock().unwrap() = None;
    drop(sends);
    let read: u64 = drains.into_iter().map(|d| d.join().unwrap()).sum();
    let Err(err) = sent else { panic!("the round went through although a stream's thread panicked") };
    assert!(err.to_string().contains("the sending thread panicked"), "{err}");
    let chunk_bytes = 16 * PAGE_SIZE as u64;
    assert!(read <= 7 * (chunk_bytes + 4096), "the other streams went on after the panic: {read} bytes read, chunks of {chunk_bytes}");
}

#[test]
fn turns_open_to_every_stream_once_none_is_given_back_for_a_while() {
    let turns = Turns::new(1, std::time::Duration::from_millis(50));
    let mut held = Some(turns.take()); // and not given back: a chunk stuck on a slow link
    std::thread::scope(|scope| {
        let other = scope.spawn(|| turns.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !other.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let opened = other.is_finished();
        held = None; // given back now, so the other thread ends either way
        drop(other.join().unwrap());
        assert!(opened, "the turns never opened");
        assert!(turns.open(), "a second turn went while the first was held, so the turns were opened");
    });
    assert!(held.is_none());
    let _third = turns.take(); // open for the rest of the round: no wait
}

/// Copy `from` into `to`: the first `buffered` bytes at once (what a tunnel's buffers take), then
/// 16 KiB at a time, 10 ms apart (a slow link), until `from` ends.
fn slow_relay(from: std::os::fd::RawFd, to: OwnedFd, buffered: usize) {
    let mut buf = vec![0u8; 16 << 10];
    let mut relayed = 0;
    loop {
        // SAFETY: reading into and writing from a buffer we own.
        let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        let mut done = 0;
        while done < n as usize {
            // SAFETY: as above.
            let w = unsafe { libc::write(to.as_raw_fd(), buf[done..].as_ptr().cast(), n as usize - done) };
            if w <= 0 {
                return;
            }
            done += w as usize;
        }
        relayed += n as usize;
        if relayed > buffered {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// A 3 MiB round in 256 KiB chunks over three streams, one at a time, through relays that take
/// the first `buffered` bytes of each stream at once and then 1.6 MB/s: each chunk past those
/// takes longer than SLOW_TURNS. Returns the batches each stream carried, once the destination's
/// memory is checked to be the source's.
fn round_over_a_slow_link(buffered: usize) -> Vec<u64> {
    let (src, dst) = source_and_empty(4 * MIB, 768);
    let chunks = split_batches(&dirty_ranges(&src), 64);
    let pairs: Vec<_> = (0..3).map(|_| socketpair()).collect();
    for (a, b) in &pairs {
        for (fd, opt) in [(a, libc::SO_SNDBUF), (b, libc::SO_RCVBUF)] {
            let size: libc::c_int = 16 << 10;
            // SAFETY: setting an int option on a socket we own.
            unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&size as *const libc::c_int).cast(), 4) };
        }
    }
    let send_fds: Vec<_> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
    let budget = PageBudget::new(dst.segments()[0].pages() as u64);
    let batches = std::thread::scope(|scope| {
        let readers: Vec<_> = pairs
            .iter()
            .map(|(_, b)| {
                let (from, dst, budget) = (b.as_raw_fd(), &dst, &budget);
                let (relay_in, read_end) = socketpair();
                scope.spawn(move || slow_relay(from, relay_in, buffered));
                scope.spawn(move || recv_share(read_end.as_raw_fd(), dst, None, budget, false, None, 3))
            })
            .collect();
        let how = Sending { at_once: 1, ..Sending::all(3) };
        let sent = send_chunks_compressed(&send_fds, &src, &chunks, None, None, how);
        for fd in &send_fds {
            // SAFETY: ending the writes of a socket we own (the relay then sees its end).
            unsafe { libc::shutdown(*fd, libc::SHUT_WR) };
        }
        for r in readers {
            r.join().unwrap().unwrap();
        }
        let sent = sent.map_err(|e| e.to_string()).unwrap();
        sent.iter().map(|(t, _)| t.batches).collect::<Vec<_>>()
    });
    let (mut a, mut b) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    src.read(GuestAddress(0), &mut a).unwrap();
    dst.read(GuestAddress(0), &mut b).unwrap();
    assert!(a == b, "destination memory differs");
    batches
}

#[test]
fn streams_taking_turns_on_a_slow_link_all_send_and_arrive_exactly() {
    // The first chunk is still going when the turns open: none stands down, all go at once.
    let batches = round_over_a_slow_link(0);
    assert!(batches.iter().all(|&b| b > 0), "a stream carried nothing on a slow link: {batches:?} batches");
    assert!(MOST_WRITING.with(|m| m.get()) > 1, "the streams still took turns on a slow link");
}

#[test]
fn a_slow_link_whose_buffers_take_the_first_chunks_at_once_still_gets_every_stream() {
    // Through a tunnel's buffers the first chunks go as fast as on one host; the streams past the
    // first must not stand down on the strength of them.
    let batches = round_over_a_slow_link(640 << 10);
    assert!(batches.iter().all(|&b| b > 0), "a stream stood down on a slow link: {batches:?} batches");
    assert!(OPENED.with(|o| o.get()), "the turns never opened");
}
