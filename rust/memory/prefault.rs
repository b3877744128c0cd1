//! Populating a migration destination's memory while it waits for the source.
//!
//! A destination that receives into memory nobody has touched pays the host for every page on
//! the clock: a fault and a clear per page (or per 2 MiB region on huge pages) while the source
//! waits on the socket. On 2 CPUs that clearing competes with the receiver and the sender for the
//! same cores. A destination usually waits seconds for its source (the operator starts it first),
//! so a thread populates its memory then, the way QEMU's `prealloc=on` does at start-up, and the
//! receiver later reads straight into pages that are there.
//!
//! What it does not change: bytes. `MADV_POPULATE_WRITE` faults pages in as zero pages would be
//! written, never altering what a page reads as, so a receive racing it (a caller that never
//! stopped it) stays exact. Pages that then arrive as ZERO ranges are given back as before, so a
//! sparse guest ends as small as without it; only the wait holds the guest's whole size.
//!
//! Which segments: unwired (wired ones are populated and locked at start-up already, in the same
//! steps with a chooser of their own: [`populate_whole`]), private
//! anonymous (a memfd handed over by a local migration replaces the memory instead), eager, and
//! not registered with a userfaultfd for write-protection (the kernel dirty backend: a write
//! fault there belongs to its handler). Where the host offers transparent huge pages, each
//! whole 2 MiB region goes onto one (a fault and a clear per region) and is advised back afterwards,
//! as a received region is ([`Segment::receives_huge`]), unless small pages are measured cheaper
//! ([`PageChooser`]).
//!
//! The thread takes [`STEP`] at a time and stops between steps when asked ([`Prefault::finish`]),
//! so stopping waits at most one step. It holds the segments (`Arc`), so their mappings outlive it.
//! It is not started where the memory is more than the host's MemAvailable less a reserve
//! ([`reserve`]; `GuestMemory::start_prefault` says so), and every 32 MiB it reads MemAvailable
//! again and stops where the next 32 MiB would leave less than the reserve: memory is
//! mapped `MAP_NORESERVE`, so a host that cannot give it answers a fault with the OOM killer, not
//! an error, and a sparse guest whose destination was given a large `-m` must still migrate as
//! before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use super::segment::Segment;

/// Bytes populated per `madvise` call between checks of the stop flag: one huge page (2 MiB).
/// A call holds the process's mmap lock for reading while it faults its pages in, and whatever
/// else the destination does that maps memory (a thread's stack, a large allocation) waits for
/// it, as does every fault queued behind such a writer. On a VM whose host had taken the memory
/// back (free page reporting), a 32 MiB step took tens of milliseconds, and a source's handshake
/// with a destination populating 3 GiB that way took 0.65-1.38 s against 5 ms without populating;
/// with 2 MiB steps, 75-107 ms. Warm 1 GiB migrations measured even (alternated, 8 pairs:
/// 3.90 against 3.91 GiB/s there, 3.95 against 3.82 with the host's memory held). Session 33.
/// Steps end at 2 MiB addresses, so each whole one is a region a huge page can back, wherever
/// the segment's mapping starts.
pub(crate) const STEP: usize = 2 << 20;

/// How much population one reading of MemAvailable vouches for: it is read again after this
/// many bytes (a read of /proc/meminfo costs about what populating a few pages does).
const AVAILABLE_CHECKED_EVERY: usize = 32 << 20;

/// One whole step in this many goes on the kind of page not chosen, so that a change in what the
/// host gives (memory it took back used up, or given back) is seen. Wiring spreads its tries by
/// how much dearer the other kind is ([`PageChooser::wiring`]).
const TRY_OTHER_EVERY: u64 = 16;

/// The most times further apart wiring's tries of the dearer kind go: one after 240 steps in a
/// row on the cheaper (480 MiB).
const TRY_SPREAD_MAX: f64 = 16.0;

/// Picks huge or small pages for each whole 2 MiB step by what steps of each cost lately (the
/// shortest of the last [`PageChooser::KEPT`] of each kind, since a lone step is far more often
/// slowed by something else, a preempted thread say, than sped up), since which is cheaper
/// depends on where the host's free memory is. Huge pages usually are (one fault and one clear
/// per 2 MiB). On a VM whose kernel reports its free memory to the hypervisor (free page
/// reporting, virtio-balloon's or Hyper-V's), the whole free 2 MiB blocks they are made of are
/// those the hypervisor took back, and it faults each in again 4 KiB at a time, while small
/// pages come from smaller free blocks it still backs; once those run out, or where the memory
/// was freed a moment ago and not reported yet, huge pages win again. Measured on such a VM
/// (docs/memory.md, session 34).
#[derive(Debug, Default)]
pub(crate) struct PageChooser {
    /// The last [`PageChooser::KEPT`] steps' seconds, small pages then huge ones, as a ring.
    recent: [[f64; PageChooser::KEPT]; 2],
    /// Steps timed of each kind.
    timed: [u64; 2],
    /// Whether the last step timed was on huge pages, and how many in a row, up to it, were.
    last_huge: bool,
    streak: u64,
    /// Whether tries of the dearer kind come further apart the dearer it is (wiring).
    spread: bool,
}

impl PageChooser {
    /// Steps of each kind remembered.
    const KEPT: usize = 3;
    /// Steps of each kind timed, alternating, before choosing.
    const FIRST: u64 = 2;

    /// A chooser for wiring memory, which a guest's start waits for: where the other kind costs k
    /// times as much, its tries come k times further apart (at most [`TRY_SPREAD_MAX`]), so that
    /// up to 16 times they cost about a sixteenth of the time, as where both cost the same. A
    /// try every 16 steps of huge pages costing nine small ones adds half again to the time
    /// small pages alone take. A population ahead of a receiver, which follows its verdict, and
    /// which runs while the destination waits, keeps trying every 16 steps.
    pub(crate) fn wiring() -> PageChooser {
        PageChooser { spread: true, ..Default::default() }
    }

    /// What a step of this kind costs lately; None before one was timed.
    fn cost(&self, huge: bool) -> Option<f64> {
        let (recent, timed) = (&self.recent[huge as usize], self.timed[huge as usize]);
        recent[..(timed as usize).min(Self::KEPT)].iter().copied().reduce(f64::min)
    }

    /// Whether huge pages are the cheaper lately: they are until [`PageChooser::FIRST`] steps of
    /// each kind were timed (a verdict from the first huge step, which pays one-time costs, would
    /// mislead the receiver that follows it) and small ones came cheaper.
    pub(crate) fn huge_cheaper(&self) -> bool {
        if self.timed[0].min(self.timed[1]) < Self::FIRST {
            return true;
        }
        match (self.cost(false), self.cost(true)) {
            (Some(small), Some(huge)) => huge <= small,
            _ => true,
        }
    }

    /// Whether the next whole step goes on huge pages: the first [`PageChooser::FIRST`] steps of
    /// each kind alternate (huge first; the very first step also pays one-time costs, so one
    /// timing of a kind is not enough), then the cheaper is taken, and after
    /// [`TRY_OTHER_EVERY`] - 1 steps of it in a row one step takes the other (for wiring, that
    /// many times how many times dearer the other is: [`PageChooser::wiring`]).
    pub(crate) fn huge_next(&self) -> bool {
        let [small, huge] = self.timed;
        if small.min(huge) < Self::FIRST {
            return huge <= small;
        }
        let cheaper = self.huge_cheaper();
        let spread = match (self.spread, self.cost(cheaper), self.cost(!cheaper)) {
            (true, Some(chosen), Some(other)) if chosen > 0.0 => (other / chosen).ceil().clamp(1.0, TRY_SPREAD_MAX),
            (true, _, _) => TRY_SPREAD_MAX,
            (false, _, _) => 1.0,
        };
        let in_a_row = if self.last_huge == cheaper { self.streak } else { 0 };
        cheaper != (in_a_row >= (TRY_OTHER_EVERY - 1) * spread as u64)
    }

    /// Count a whole step that took `seconds` on huge pages or on small ones.
    pub(crate) fn timed(&mut self, huge: bool, seconds: f64) {
        let kind = huge as usize;
        self.recent[kind][(self.timed[kind] % Self::KEPT as u64) as usize] = seconds;
        self.timed[kind] += 1;
        self.streak = if huge == self.last_huge { self.streak + 1 } else { 1 };
        self.last_huge = huge;
    }

    /// Populate one step of `seg` (`off..off+len`, from [`steps`]) with `MADV_POPULATE_WRITE`: a
    /// whole 2 MiB region on huge pages or small ones as chosen, where the segment takes huge
    /// pages ([`Segment::populates_huge`]; advised back to small pages after), timed; a part of
    /// a region on small pages, untimed. Returns whether it went on huge pages, or the errno the
    /// kernel refused it with.
    pub(crate) fn populate_step(&mut self, seg: &Segment, off: usize, len: usize) -> Result<bool, Option<i32>> {
        let chosen = seg.populates_huge() && len == STEP;
        let huge = chosen && self.huge_next();
        let started = Instant::now();
        if huge {
            seg.advise_huge(off, len);
        }
        // SAFETY: off..off+len lies inside the segment's mapping (the caller's step of it), which
        // the caller's reference keeps mapped; MADV_POPULATE_WRITE only faults pages in and never
        // changes their bytes.
        let rc = unsafe { libc::madvise(seg.as_ptr().add(off) as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if huge {
            seg.advise_small(off, len);
        }
        if rc != 0 {
            return Err(errno);
        }
        if chosen {
            self.timed(huge, started.elapsed().as_secs_f64());
        }
        Ok(huge)
    }
}

/// The steps of `off..off+len` in `seg` a population takes: each at most [`STEP`] long and
/// ending at a 2 MiB address, so each whole one is a region a huge page can back.
pub(crate) fn steps(seg: &Segment, off: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let (base, end) = (seg.as_ptr() as usize, off + len);
    let mut at = off;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let step = (STEP - (base + at) % STEP).min(end - at);
            at += step;
            (at - step, step)
        })
    })
}

/// What a population did, for the destination's statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefaultStats {
    /// Bytes of guest memory populated (the steps finished).
    pub bytes: u64,
    /// Bytes of the segments it was asked to populate.
    pub target_bytes: u64,
    /// Wall seconds from start to the last step finished (or to the stop).
    pub seconds: f64,
    /// CPU seconds the populating thread used.
    pub cpu_seconds: f64,
    /// Stopped before every byte was populated.
    pub stopped: bool,
    /// A step the kernel refused (ENOMEM: the host could not give the memory, EFAULT, ...): the
    /// errno of the first, after which the thread stopped. Advisory: receiving still works.
    pub refused: Option<i32>,
    /// Bytes of it populated in whole 2 MiB steps advised for transparent huge pages
    /// ([`PageChooser`]; whether the kernel found a huge page for each is its own affair).
    pub huge_bytes: u64,
    /// Whether huge pages were the cheaper by the end (as a population that timed none says:
    /// true); every segment was told ([`Segment::huge_cheaper`]).
    pub huge_cheaper: bool,
    /// Stopped because the host's available memory (MemAvailable) fell below [`reserve`]: the
    /// bytes it had left then. A guest that is mostly zero still migrates where populating all of
    /// it would not fit, and the population must never be what wakes the OOM killer.
    pub short_of_memory: Option<u64>,
}

impl Default for PrefaultStats {
    /// Nothing populated, and huge pages not found dearer (nothing was timed).
    fn default() -> Self {
        PrefaultStats {
            bytes: 0,
            target_bytes: 0,
            seconds: 0.0,
            cpu_seconds: 0.0,
            stopped: false,
            refused: None,
            huge_bytes: 0,
            huge_cheaper: true,
            short_of_memory: None,
        }
    }
}

/// What the host must keep available for others while a population runs: a twentieth of its
/// memory, and at least 512 MiB.
pub(crate) fn reserve() -> u64 {
    (super::segment::physical_memory() / 20).max(512 << 20)
}

/// The host's MemAvailable in bytes, if /proc/meminfo says.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A running population of some segments.
pub struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<PrefaultStats>>,
}

/// Whether `seg` may be populated ahead (see the module doc).
pub(crate) fn eligible(seg: &Segment, tracked_by_kernel: bool) -> bool {
    !tracked_by_kernel && seg.plain_anonymous() && !seg.is_closed() && seg.install_open().is_none()
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl Prefault {
    /// Start populating `segments` (the caller chose eligible ones) on a thread of its own,
    /// leaving the host at least `keep_available` bytes of available memory (see [`reserve`]).
    pub fn start(segments: Vec<Arc<Segment>>, keep_available: u64) -> Prefault {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-prefault".into())
            .spawn(move || populate(&segments, &flag, keep_available))
            .expect("spawning the prefault thread");
        Prefault { stop, thread: Some(thread) }
    }

    /// Stop (at the end of the current step) and return what was done.
    pub fn finish(mut self) -> PrefaultStats {
        self.stop_and_join()
    }

    /// Wait until it is done by itself (populated everything, or stopped on its own), and
    /// return what was done. (Tests: a destination stops it when its source comes.)
    #[cfg(test)]
    pub fn wait(mut self) -> PrefaultStats {
        self.thread.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default()
    }

    fn stop_and_join(&mut self) -> PrefaultStats {
        self.stop.store(true, Ordering::Release);
        self.thread.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn populate(segments: &[Arc<Segment>], stop: &AtomicBool, reserve: u64) -> PrefaultStats {
    let started = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut stats = PrefaultStats { target_bytes: segments.iter().map(|s| s.size() as u64).sum(), ..Default::default() };
    // One chooser for the whole population: what the host gives does not depend on the segment,
    // and its verdict goes to every segment, the ones not reached yet too, for the receiver.
    let mut chooser = PageChooser::default();
    let tell = |chooser: &PageChooser| segments.iter().for_each(|s| s.set_huge_cheaper(chooser.huge_cheaper()));
    tell(&chooser);
    'all: for seg in segments {
        // Bytes the last reading of MemAvailable still vouches for.
        let mut vouched = 0;
        for (off, len) in steps(seg, 0, seg.size()) {
            if stop.load(Ordering::Acquire) || seg.is_closed() {
                stats.stopped = true;
                break 'all;
            }
            if vouched < len {
                if let Some(left) = available_memory().filter(|&a| a < reserve + AVAILABLE_CHECKED_EVERY as u64) {
                    stats.short_of_memory = Some(left);
                    stats.stopped = true;
                    break 'all;
                }
                vouched = AVAILABLE_CHECKED_EVERY;
            }
            vouched -= len;
            if !stats.count(chooser.populate_step(seg, off, len), len) {
                break 'all;
            }
            tell(&chooser);
        }
    }
    stats.finish(&chooser, started, cpu0)
}

/// What long work on the calling thread asks to learn whether the process was interrupted (set
/// once by whoever embeds the core: the Python binding runs Python's pending signal handlers,
/// and Ctrl-C's raises KeyboardInterrupt).
static INTERRUPT_CHECK: OnceLock<fn() -> bool> = OnceLock::new();

/// Wiring asks [`interrupted`] once every this many steps (64 MiB where the mapping starts on a
/// 2 MiB boundary, a few milliseconds).
pub(crate) const INTERRUPT_EVERY: usize = 32;

/// Set the check long work calls (`interrupted`); only the first call sets it (whether this one
/// did). The check may have effects (the binding's runs signal handlers and keeps what one
/// raised), so work it answers true must end with [`MemoryError::Interrupted`], which the
/// embedder turns back into what interrupted it.
///
/// [`MemoryError::Interrupted`]: super::MemoryError::Interrupted
pub fn set_interrupt_check(check: fn() -> bool) -> bool {
    INTERRUPT_CHECK.set(check).is_ok()
}

/// Whether the process was interrupted: false where nothing set a check. True must end the
/// caller's work with `MemoryError::Interrupted` ([`set_interrupt_check`]).
pub(crate) fn interrupted() -> bool {
    INTERRUPT_CHECK.get().is_some_and(|check| check())
}

/// Populate all of `seg`, being wired (`Segment::wire`, locked on fault already), on the calling
/// thread: 2 MiB a step, each whole region on whichever kind of page the steps time cheaper.
/// Stops at a step the kernel refuses (`MADV_POPULATE_WRITE` is Linux 5.14+); the caller's
/// `mlock` then populates the rest, or fails. Interrupted ([`interrupted`], asked every
/// [`INTERRUPT_EVERY`] steps), it stops and returns the bytes populated by then as the error:
/// wiring a large guest takes seconds, and Ctrl-C should not wait for all of it.
pub(crate) fn populate_whole(seg: &Segment) -> Result<PrefaultStats, u64> {
    let started = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut stats = PrefaultStats { target_bytes: seg.size() as u64, ..Default::default() };
    let mut chooser = PageChooser::wiring();
    for (i, (off, len)) in steps(seg, 0, seg.size()).enumerate() {
        if i > 0 && i % INTERRUPT_EVERY == 0 && interrupted() {
            return Err(stats.bytes);
        }
        if !stats.count(chooser.populate_step(seg, off, len), len) {
            break;
        }
    }
    seg.set_huge_cheaper(chooser.huge_cheaper());
    Ok(stats.finish(&chooser, started, cpu0))
}

impl PrefaultStats {
    /// Two populations' statistics as one (a guest's segments, wired one after the other): sums,
    /// the first refusal, and the later verdict.
    pub(crate) fn merge(self, later: PrefaultStats) -> PrefaultStats {
        PrefaultStats {
            bytes: self.bytes + later.bytes,
            target_bytes: self.target_bytes + later.target_bytes,
            seconds: self.seconds + later.seconds,
            cpu_seconds: self.cpu_seconds + later.cpu_seconds,
            stopped: self.stopped || later.stopped,
            refused: self.refused.or(later.refused),
            huge_bytes: self.huge_bytes + later.huge_bytes,
            huge_cheaper: later.huge_cheaper,
            short_of_memory: self.short_of_memory.or(later.short_of_memory),
        }
    }

    /// Count a step of `len` bytes that went on huge pages (true) or small ones, or was refused;
    /// whether to go on.
    fn count(&mut self, step: Result<bool, Option<i32>>, len: usize) -> bool {
        match step {
            Ok(huge) => {
                self.bytes += len as u64;
                self.huge_bytes += if huge { len as u64 } else { 0 };
                true
            }
            Err(errno) => {
                self.refused = errno;
                self.stopped = true;
                false
            }
        }
    }

    fn finish(mut self, chooser: &PageChooser, started: Instant, cpu0: f64) -> PrefaultStats {
        self.huge_cheaper = chooser.huge_cheaper();
        self.seconds = started.elapsed().as_secs_f64();
        self.cpu_seconds = thread_cpu_seconds() - cpu0;
        self
    }
}
