//! Tests of post-copy's page exchange: a destination holding part of the guest reads every byte
//! exactly as the source has it, fetching only the pages it lacks, through every access path the
//! memory core has; a link cut in the middle makes loads wait, and a new link resumes them with
//! nothing lost; a reply that is not the one asked for is refused and never seen.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::batch_tests::socketpair;
use super::postcopy::*;
use super::{Wait, POSTCOPY_CHUNK};
use crate::memory::{GuestAddress, GuestMemory, LoadPlan, MemoryOptions};

const MIB: u64 = 1 << 20;
const PAGES: u64 = 1024; // 4 MiB

fn guest() -> GuestMemory {
    GuestMemory::new(&MemoryOptions::new(4 * MIB)).unwrap()
}

fn page(p: u64, version: u8) -> [u8; 4096] {
    if p.is_multiple_of(11) {
        [0; 4096]
    } else {
        [(p % 200) as u8 + version + 1; 4096]
    }
}

fn image(mem: &GuestMemory) -> Vec<u8> {
    let mut out = vec![0u8; (PAGES * 4096) as usize];
    mem.read(GuestAddress(0), &mut out).unwrap();
    out
}

/// A source whose pages are all written (version 1 on odd pages, 0 elsewhere) and a destination
/// that holds version 0 of every page: the odd pages are what it lacks, as runs.
fn setup() -> (Arc<GuestMemory>, GuestMemory, Vec<(u64, u64)>) {
    let (src, dst) = (guest(), guest());
    for p in 0..PAGES {
        dst.write(GuestAddress(p * 4096), &page(p, 0)).unwrap();
        src.write(GuestAddress(p * 4096), &page(p, (p % 2) as u8)).unwrap();
    }
    let runs: Vec<(u64, u64)> = (0..PAGES).filter(|p| p % 2 == 1).map(|p| (p, 1)).collect();
    (Arc::new(src), dst, runs)
}

fn serve(src: Arc<GuestMemory>, fd: OwnedFd, needs: ChunkNeeds) -> thread::JoinHandle<(Result<(), String>, u64)> {
    thread::spawn(move || {
        let stats = ServeStats::default();
        let r = serve_pages(&src, fd.as_raw_fd(), &needs, &stats).map_err(|e| e.to_string());
        (
            r,
            stats.demand_pages.load(std::sync::atomic::Ordering::Relaxed)
                + stats.background_pages.load(std::sync::atomic::Ordering::Relaxed),
        )
    })
}

#[test]
fn only_the_lacking_pages_are_fetched_and_every_byte_matches() {
    let (src, dst, runs) = setup();
    let needs = ChunkNeeds::from_runs(&dst, POSTCOPY_CHUNK, &runs).unwrap();
    assert_eq!(needs.pages(), PAGES / 2);
    let link = Arc::new(PostcopyLink::new("test source", needs.clone()));
    make_postcopy(&dst, link.clone()).unwrap();
    let (a, b) = socketpair();
    let server = serve(src.clone(), b, needs);
    link.attach(a);
    // A demand read in the middle, then the fill from just past it.
    let mut buf = [0u8; 8];
    dst.read(GuestAddress(301 * 4096), &mut buf).unwrap();
    assert_eq!(buf, [page(301, 1)[0]; 8]);
    dst.lazy_image().unwrap().start_loading(LoadPlan { fill: true, follow_demand: true, ..LoadPlan::default() }).unwrap();
    for _ in 0..500 {
        if dst.is_complete() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(dst.is_complete(), "every chunk loaded");
    link.finish().unwrap();
    let (served, pages) = server.join().unwrap();
    served.unwrap();
    assert_eq!(pages, PAGES / 2, "only the pages the destination lacked were sent");
    assert!(image(&dst) == image(&src), "the destination's memory is the source's");
    let stats = link.stats();
    assert_eq!(stats.demand_chunks, 1);
    assert_eq!(stats.demand_pages + stats.background_pages, PAGES / 2);
}

#[test]
fn a_cut_link_makes_loads_wait_and_a_new_one_resumes_them() {
    let (src, dst, runs) = setup();
    let needs = ChunkNeeds::from_runs(&dst, POSTCOPY_CHUNK, &runs).unwrap();
    let link = Arc::new(PostcopyLink::new("test source", needs.clone()));
    make_postcopy(&dst, link.clone()).unwrap();
    let (a, b) = socketpair();
    drop(b); // the source is gone before the first request
    link.attach(a);
    let dst = Arc::new(dst);
    let reader = {
        let dst = dst.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 4096 * 40];
            dst.read(GuestAddress(0), &mut buf).map(|_| buf)
        })
    };
    for _ in 0..500 {
        if link.stats().link_failures > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(link.down().unwrap().contains("page link failed"), "{:?}", link.down());
    assert!(!reader.is_finished(), "the read waits for the link");
    let (a, b) = socketpair();
    let server = serve(src.clone(), b, needs);
    link.attach(a);
    let got = reader.join().unwrap().unwrap();
    assert!(got[..] == image(&src)[..4096 * 40], "the read sees the source's pages once the link is back");
    dst.ensure_all().unwrap();
    link.finish().unwrap();
    server.join().unwrap().0.unwrap();
    assert!(image(&dst) == image(&src));
}

#[test]
fn a_reply_for_another_chunk_or_with_a_bad_hash_is_refused_and_never_seen() {
    let (src, dst, runs) = setup();
    let needs = ChunkNeeds::from_runs(&dst, POSTCOPY_CHUNK, &runs).unwrap();
    let link = Arc::new(PostcopyLink::new("test source", needs.clone()));
    make_postcopy(&dst, link.clone()).unwrap();
    let (a, b) = socketpair();
    link.attach(a);
    let dst = Arc::new(dst);
    let reader = {
        let dst = dst.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            dst.read(GuestAddress(4096), &mut buf).map(|_| buf)
        })
    };
    // A forged source: answers chunk 0's request with a reply whose hash is wrong.
    let mut req = [0u8; 16];
    let n = unsafe { libc::read(b.as_raw_fd(), req.as_mut_ptr().cast(), 16) };
    assert_eq!(n, 16);
    assert_eq!(&req[..4], b"VMPQ");
    let mut reply = vec![0u8; 40 + 8 * 4096];
    reply[..4].copy_from_slice(b"VMPA");
    reply[4..6].copy_from_slice(&1u16.to_le_bytes());
    reply[6..8].copy_from_slice(&req[6..8]);
    reply[16..24].copy_from_slice(&needs.mask(0).to_le_bytes());
    reply[40..].fill(0xEE);
    let w = unsafe { libc::write(b.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
    assert_eq!(w as usize, reply.len());
    for _ in 0..500 {
        if link.down().is_some_and(|d| d.contains("hash")) {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(link.down().unwrap().contains("does not match its hash: refused"), "{:?}", link.down());
    assert!(!reader.is_finished(), "the reader never sees the refused bytes: it waits");
    let (a, b2) = socketpair();
    let server = serve(src.clone(), b2, needs);
    link.attach(a);
    assert_eq!(reader.join().unwrap().unwrap(), page(1, 1));
    dst.ensure_all().unwrap();
    link.finish().unwrap();
    server.join().unwrap().0.unwrap();
    assert!(image(&dst) == image(&src));
}

#[test]
fn runs_outside_memory_and_bad_chunk_sizes_are_refused_by_name() {
    let dst = guest();
    let err = ChunkNeeds::from_runs(&dst, POSTCOPY_CHUNK, &[(PAGES - 1, 2)]).unwrap_err();
    assert!(err.contains("page frame 0x3ff (2 pages)"), "{err}");
    let err = ChunkNeeds::from_runs(&dst, 65 * 4096, &[]).unwrap_err();
    assert!(err.contains("chunk size 266240"), "{err}");
}

#[test]
fn the_exchange_goes_over_tls_reading_what_the_session_already_holds_first() {
    let (src, dst, runs) = setup();
    let needs = ChunkNeeds::from_runs(&dst, POSTCOPY_CHUNK, &runs).unwrap();
    let link = Arc::new(PostcopyLink::new("test source", needs.clone()));
    make_postcopy(&dst, link.clone()).unwrap();
    let (client, server, a, b) = super::tls::tests::pair();
    let (client, server) = (Arc::new(client), Arc::new(server));
    // The destination's last frame, then at once its first page request: both arrive before the
    // source reads the frame, so the request is plaintext the session holds, which no poll sees.
    client.send_parts(&[b"RESUMED"], "a frame").unwrap();
    link.attach(PageConn::tls(OwnedFd::from(a.try_clone().unwrap()), client.clone()));
    let dst = Arc::new(dst);
    let reader = {
        let dst = dst.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            dst.read(GuestAddress(3 * 4096), &mut buf).map(|_| buf)
        })
    };
    // Both records queued (each adds 22 bytes), before the source reads anything.
    let queued = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int into ours.
        unsafe { libc::ioctl(b.as_raw_fd(), libc::FIONREAD, &mut n) };
        n as usize
    };
    for _ in 0..2000 {
        if queued() >= 7 + 16 + 2 * 22 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut frame = [0u8; 7];
    assert_eq!(server.recv(&mut frame, Wait::Timeout, false).unwrap(), 7);
    assert_eq!(&frame, b"RESUMED");
    assert!(server.pending() >= 16, "the request came in with the frame ({} bytes held)", server.pending());
    let serving = {
        let (src, server, needs) = (src.clone(), server.clone(), needs.clone());
        thread::spawn(move || serve_pages(&src, &*server, &needs, &ServeStats::default()).map_err(|e| e.to_string()))
    };
    assert_eq!(reader.join().unwrap().unwrap(), page(3, 1));
    dst.ensure_all().unwrap();
    link.finish().unwrap();
    serving.join().unwrap().unwrap();
    assert!(image(&dst) == image(&src), "every byte as the source has it, through TLS");
    // The session goes on carrying frames after "done".
    client.send_parts(&[b"RELEASED"], "a frame").unwrap();
    let mut frame = [0u8; 8];
    assert_eq!(server.recv(&mut frame, Wait::Timeout, false).unwrap(), 8);
    assert_eq!(&frame, b"RELEASED");
}
