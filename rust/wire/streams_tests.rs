//! Tests of parallel streams: a round sent over several fds arrives bit-exact, each fd's share
//! ended by an empty batch; a stream that fails names itself.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::*;
use crate::memory::{GuestAddress, GuestMemory, MemoryOptions};
use crate::progress::Meter;
use crate::wire::{build_ranges_from_bitmap, send_batch, split_batches, CompressMode, Compressor};

const MIB: u64 = 1 << 20;

fn guest(size: u64) -> GuestMemory {
    GuestMemory::new(&MemoryOptions::new(size)).unwrap()
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
                scope.spawn(move || recv_share(fd, dst, None, budget, false, Some(meter)).unwrap())
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
    let seg = &src.segments()[0];
    let mut words = vec![0u64; seg.pages().div_ceil(64)];
    src.get_and_clear_dirty_segment(0, &mut words).unwrap();
    let chunks = split_batches(&build_ranges_from_bitmap(seg, &words, true).unwrap(), 16);
    let (a0, b0) = socketpair();
    let (a1, b1) = socketpair();
    drop(b1); // stream 1's peer is gone
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: reading into a buffer we own.
        while unsafe { libc::read(b0.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) } > 0 {}
    });
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
    let err = recv_share(b.as_raw_fd(), &dst, None, &budget, false, None).unwrap_err();
    assert_eq!(err.to_string(), "the round carried more pages (56) than the guest has (50)");
    assert_eq!(err.errno(), libc::EBADMSG);
    let b = send(CompressMode::Lz4);
    let err = recv_share(b.as_raw_fd(), &dst, None, &PageBudget::new(1000), false, None).unwrap_err();
    assert!(matches!(err, PageError::CompressionNotAgreed), "{err}");
    // Refused unread: the block never reached the decompressor, no guest byte was written.
    let mut page = vec![0xFFu8; 16 * 4096];
    dst.read(GuestAddress(0), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "a refused batch wrote guest memory");
    let b = send(CompressMode::Lz4);
    let got = recv_share(b.as_raw_fd(), &dst, None, &PageBudget::new(1000), true, None).unwrap();
    assert_eq!((got.batches, got.stats.data_pages, got.stats.compressed_batches), (1, 16, 1));
}
