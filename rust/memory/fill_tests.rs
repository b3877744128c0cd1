//! Loading ahead and recording accesses on lazily restored memory, with a source in memory that
//! logs the order of its loads and can hold one chunk's load until released.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::dirty::TrackingChoice;

const MIB: u64 = 1 << 20;
const CHUNK: usize = 1 << 20;

/// Chunks all zero; `bad` ones fail as a hash mismatch would; the load of `held` (if any) sets
/// `holding` and waits until `release` is set (10 s at most, so a broken test fails instead of
/// hanging).
struct Logged {
    bad: Vec<usize>,
    held: Option<usize>,
    holding: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    order: Arc<Mutex<Vec<usize>>>,
}

impl ChunkSource for Logged {
    fn name(&self) -> &str {
        "logged"
    }
    unsafe fn load(&self, index: usize, _parts: &[ChunkPart]) -> Result<(), ChunkFault> {
        if self.held == Some(index) {
            self.holding.store(true, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(10);
            while !self.release.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.order.lock().unwrap().push(index);
        if self.bad.contains(&index) {
            return Err(ChunkFault::Mismatch);
        }
        Ok(())
    }
}

struct Setup {
    mem: GuestMemory,
    order: Arc<Mutex<Vec<usize>>>,
    holding: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

/// 8 MiB in 8 chunks of 1 MiB (lowmem 4 MiB, highmem 4 MiB).
fn lazy(bad: &[usize], held: Option<usize>) -> Setup {
    let order = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicBool::new(false));
    let opts = MemoryOptions {
        memsize: 8 * MIB,
        wired: false,
        lowmem_limit: 4 * MIB,
        tracking: TrackingChoice::Soft,
        backing: Backing::Anonymous,
    };
    let source = Logged { bad: bad.to_vec(), held, holding: holding.clone(), release: release.clone(), order: order.clone() };
    let mem = GuestMemory::lazy(&opts, CHUNK, Box::new(source)).unwrap();
    Setup { mem, order, holding, release }
}

fn image(mem: &GuestMemory) -> &Arc<LazyImage> {
    mem.lazy_image().unwrap()
}

/// Wait (10 s at most) until `done` holds.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The guest-physical address of byte `offset` of chunk `chunk` (chunks 4.. are highmem).
fn at(chunk: u64, offset: u64) -> u64 {
    if chunk < 4 {
        chunk * MIB + offset
    } else {
        HIGHMEM_BASE + (chunk - 4) * MIB + offset
    }
}

fn read(mem: &GuestMemory, gpa: u64) -> Result<u8, MemoryError> {
    let mut b = [0u8];
    mem.read(GuestAddress(gpa), &mut b).map(|_| b[0])
}

#[test]
fn the_loader_takes_the_prefetch_list_first_then_fills_the_rest_in_order() {
    let s = lazy(&[], None);
    let plan = LoadPlan { prefetch: vec![5, 3, 99], fill: true, ..LoadPlan::default() };
    image(&s.mem).start_loading(plan).unwrap();
    wait_until("resident", || image(&s.mem).is_resident());
    assert_eq!(*s.order.lock().unwrap(), vec![5, 3, 0, 1, 2, 4, 6, 7], "99 is past the end and skipped");
    let stats = image(&s.mem).stats();
    assert_eq!((stats.prefetched, stats.filled, stats.demand_loads, stats.waits), (2, 6, 0, 0));
    assert!(stats.resident_after.is_some());
    assert!(s.mem.is_complete());
    assert!(image(&s.mem).start_loading(LoadPlan::default()).is_err(), "one loader per image");
}

#[test]
fn without_fill_only_the_prefetch_list_is_loaded() {
    let s = lazy(&[], None);
    image(&s.mem).start_loading(LoadPlan { prefetch: vec![6, 2], ..LoadPlan::default() }).unwrap();
    wait_until("both loaded", || s.order.lock().unwrap().len() == 2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(*s.order.lock().unwrap(), vec![6, 2]);
    assert!(!image(&s.mem).is_resident());
}

#[test]
fn a_demand_load_of_another_chunk_does_not_wait_behind_the_fill() {
    let s = lazy(&[], Some(0));
    image(&s.mem).start_loading(LoadPlan { fill: true, ..LoadPlan::default() }).unwrap();
    wait_until("the fill holds chunk 0", || s.holding.load(Ordering::SeqCst));
    assert_eq!(read(&s.mem, at(5, 0)).unwrap(), 0); // chunk 5 (highmem)
    assert!(!s.release.load(Ordering::SeqCst));
    assert_eq!(s.order.lock().unwrap().first(), Some(&5), "chunk 5 loaded while the fill still held chunk 0");
    let stats = image(&s.mem).stats();
    assert_eq!((stats.demand_loads, stats.waits), (1, 1));
    // A reader of chunk 0 itself waits for the loader's load rather than loading it twice.
    let mem = Arc::new(s.mem);
    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || read(&mem, 100).unwrap())
    };
    std::thread::sleep(Duration::from_millis(20));
    s.release.store(true, Ordering::SeqCst);
    assert_eq!(reader.join().unwrap(), 0);
    wait_until("resident", || image(&mem).is_resident());
    assert_eq!(s.order.lock().unwrap().iter().filter(|&&i| i == 0).count(), 1);
    let stats = image(&mem).stats();
    assert_eq!((stats.demand_loads, stats.filled), (1, 7));
    assert!((1..=2).contains(&stats.waits), "the reader of chunk 0 waited, unless it came after the release");
}

#[test]
fn a_bad_chunk_found_by_the_fill_fails_as_a_demand_load_would_and_rings_the_notifier() {
    let s = lazy(&[3], None);
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fresh fds into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are ours alone from here on.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    image(&s.mem).notify_on_failure(tx);
    image(&s.mem).start_loading(LoadPlan { fill: true, ..LoadPlan::default() }).unwrap();
    let mut buf = [0u8; 1];
    // SAFETY: a blocking one-byte read into our buffer; the fill rings it within the test's time.
    assert_eq!(unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, 1) }, 1);
    let expected = "logged: memory chunk 3 (file bytes 0x300000..0x400000, guest-physical 0x300000..0x400000) does not match its \
                    recorded hash; the guest may not use it";
    assert_eq!(image(&s.mem).first_failure().unwrap().to_string(), expected);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(*s.order.lock().unwrap(), vec![0, 1, 2, 3], "the fill stops at the bad chunk");
    assert_eq!(read(&s.mem, 3 * MIB + 5).unwrap_err().to_string(), expected, "and a demand load gets the same error");
    assert!(!image(&s.mem).is_resident() && !s.mem.is_complete());
}

#[test]
fn recording_notes_accessed_chunks_in_first_access_order_whoever_loaded_them() {
    let s = lazy(&[], None);
    let plan = LoadPlan {
        prefetch: vec![1],
        fill: false,
        record_for: Some(Duration::from_secs(30)),
        record_limit: 3,
        loaders: 1,
        follow_demand: false,
    };
    image(&s.mem).start_loading(plan).unwrap();
    wait_until("chunk 1 prefetched", || image(&s.mem).stats().prefetched == 1);
    assert_eq!(s.mem.loaded_prefix(), 0, "while recording every access asks");
    for gpa in [at(6, 0), at(1, 7), at(6, 1), at(2, 0)] {
        read(&s.mem, gpa).unwrap();
    }
    assert_eq!(image(&s.mem).wait_recorded(Duration::from_secs(10)), Some(vec![6, 1, 2]), "the limit of 3 ends recording");
    let stats = image(&s.mem).stats();
    assert!(!stats.recording);
    assert_eq!((stats.recorded, stats.demand_loads, stats.prefetched), (3, 2, 1));
    s.mem.ensure_all().unwrap();
    assert!(s.mem.is_complete());
    assert_eq!(s.mem.loaded_prefix(), u64::MAX);
}

#[test]
fn recording_ends_after_its_time_and_complete_memory_then_reads_complete() {
    let s = lazy(&[], None);
    // Long enough that the fill and the read below fit in it on a loaded machine (100 ms once
    // did not always), short enough for a test.
    let record_for = Duration::from_secs(1);
    let plan = LoadPlan { fill: true, record_for: Some(record_for), record_limit: 100, ..LoadPlan::default() };
    let started = Instant::now();
    image(&s.mem).start_loading(plan).unwrap();
    wait_until("resident", || image(&s.mem).is_resident());
    read(&s.mem, at(4, 0)).unwrap();
    assert!(started.elapsed() < record_for, "the read came {:?} after the start: too late to be recorded", started.elapsed());
    assert_eq!(image(&s.mem).wait_recorded(Duration::from_secs(10)), Some(vec![4]));
    assert!(started.elapsed() >= record_for, "recording ended after its time, not before");
    assert!(s.mem.is_complete(), "resident and no longer recording");
    let stats = image(&s.mem).stats();
    assert_eq!((stats.filled, stats.demand_loads, stats.waits), (8, 0, 0), "an access to a chunk the fill loaded does not wait");
}

#[test]
fn recording_lasts_its_time_whatever_the_other_loaders_do() {
    let s = lazy(&[], None);
    let plan = LoadPlan { fill: true, record_for: Some(Duration::from_secs(30)), record_limit: 100, loaders: 3, ..LoadPlan::default() };
    image(&s.mem).start_loading(plan).unwrap();
    wait_until("resident", || image(&s.mem).is_resident());
    std::thread::sleep(Duration::from_millis(20));
    assert!(image(&s.mem).stats().recording, "loaders done with their chunks do not end the recording");
    read(&s.mem, at(7, 0)).unwrap();
    image(&s.mem).stop_loading();
    assert_eq!(image(&s.mem).wait_recorded(Duration::from_secs(10)), Some(vec![7]));
    assert_eq!(s.order.lock().unwrap().len(), 8, "three loaders loaded each chunk once");
}

#[test]
fn closing_the_memory_stops_the_loader() {
    let s = lazy(&[], Some(1));
    image(&s.mem)
        .start_loading(LoadPlan { fill: true, record_for: Some(Duration::from_secs(60)), record_limit: 10, ..LoadPlan::default() })
        .unwrap();
    s.mem.close().unwrap();
    s.release.store(true, Ordering::SeqCst);
    assert!(image(&s.mem).wait_recorded(Duration::from_secs(10)).is_some(), "recording ends at once");
    std::thread::sleep(Duration::from_millis(20));
    assert!(s.order.lock().unwrap().len() <= 2, "{:?}", s.order.lock().unwrap());
}
