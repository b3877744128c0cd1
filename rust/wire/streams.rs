//! One round's pages over several file descriptors at once (parallel migration streams), and
//! the receiving end of a round on one fd (`recv_share`), which every stream's receiver calls.
//!
//! The caller harvests the round once and cuts its ranges into chunks, each one batch's worth
//! inside one segment (`split_batches`); `send_chunks` then runs one thread per fd, each taking
//! the next unsent chunk and writing it as one ordinary page batch (`send_batch`), until none is
//! left, and ends its fd's share with an empty batch (the end-of-round marker a migration
//! receiver waits for).
//!
//! With compression (`send_chunks_compressed`) each stream's thread has a compressor of its own
//! (`compress`), which sends each chunk it takes as LZ4 batches where that pays, as one stream
//! would: the receivers already take compressed batches on every stream the session agreed to.
//!
//! Chunks are taken as streams become free rather than dealt out in equal shares up front, so a
//! stream whose reader is slower carries less and the round ends when the last chunk lands, not
//! when the slowest stream's fixed share does. Every page of the round goes in exactly one chunk,
//! so the receivers may write them in any order.
//!
//! The caller may let fewer streams send at once than there are ([`Sending::at_once`]): a stream
//! takes a turn before each chunk, in the order the streams asked, and gives it back once the
//! chunk is written, so at most `at_once` of them have a chunk going at a time. The streams past
//! the first `at_once` stand down for the round once [`STAND_DOWN_BYTES`] have gone quickly (or
//! every chunk is taken): they carry no chunk, only the end of their share
//! ([`Turns::stands_down`]). If instead the chunks turn out slow (waiting on a network, not on
//! CPUs: [`SLOW_TURNS`]), every stream may go for the rest of the round.
//!
//! This file decides nothing about which pages a round carries (the caller harvests), nor what a
//! stream is beyond an fd the caller owns and keeps open for the call.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::batch::PageRange;
use super::batch_io::{
    install_window_pages, pipeline_installers, recv_batch_admitted, send_batch_metered, BatchTotals, Install, INSTALL_MIN,
};
use super::compress::{CompressMode, Compressor};
use super::fdio::Link;
use crate::digest::DigestTracker;
use crate::digest::PageError;
use crate::memory::GuestMemory;
use crate::progress::{self, Meter};

/// The most fds `send_chunks` drives at once.
pub const MAX_STREAMS: usize = 16;

/// Name the stream in an OS error, so "connection reset" says which connection.
fn on_stream(index: usize, err: PageError) -> PageError {
    match err {
        PageError::Io { what, source } => PageError::Io { what: format!("stream {index}: {what}"), source },
        other => other,
    }
}

/// Send `chunks` over `fds` in parallel, one thread per fd, each taking the next unsent chunk as
/// one batch (hashing its pages into `tracker` on the way, when given); then each fd gets an
/// empty batch ending its share of the round. Returns what each fd carried (in `fds` order). On
/// the first failure (an error, or a stream's thread panicking) the other streams take no
/// further chunk and send no end marker; the error of the stream that failed first is returned,
/// once every thread has finished (a blocked write ends by the fd's send timeout or by the peer
/// going away).
/// `meter`, when given, is told the chunks' pages first and advances as every stream writes.
pub fn send_chunks<'a, L: Into<Link<'a>> + Copy + Sync>(
    fds: &[L],
    mem: &GuestMemory,
    chunks: &[Vec<PageRange>],
    tracker: Option<&DigestTracker>,
    meter: Option<&Meter>,
) -> Result<Vec<BatchTotals>, PageError> {
    let sent = send_chunks_compressed(fds, mem, chunks, tracker, meter, Sending::all(fds.len()))?;
    Ok(sent.into_iter().map(|(totals, _)| totals).collect())
}

/// How a round's streams send (see [`send_chunks_compressed`]).
#[derive(Clone, Copy, Debug)]
pub struct Sending {
    /// Each stream's compressor's mode; `CompressMode::Off` for none.
    pub compress: CompressMode,
    /// The bytes/s each stream's compressor believes its stream carries.
    pub link_hint: Option<f64>,
    /// How many streams may have a chunk going at once: at least 1; the fds' count or more lets
    /// every stream send whenever it is free.
    pub at_once: usize,
}

impl Sending {
    /// Every one of `streams` streams sending whenever it is free, uncompressed.
    pub fn all(streams: usize) -> Sending {
        Sending { compress: CompressMode::Off, link_hint: None, at_once: streams }
    }
}

/// [`send_chunks`], each stream sending its chunks through a compressor of its own in
/// `how.compress` (none for `CompressMode::Off`) that believes its stream carries `how.link_hint`
/// bytes/s, and at most `how.at_once` streams writing a chunk at a time. Returns each fd's totals
/// and its compressor (attempts, the link rate it measured).
pub fn send_chunks_compressed<'a, L: Into<Link<'a>> + Copy + Sync>(
    fds: &[L],
    mem: &GuestMemory,
    chunks: &[Vec<PageRange>],
    tracker: Option<&DigestTracker>,
    meter: Option<&Meter>,
    how: Sending,
) -> Result<Vec<(BatchTotals, Option<Compressor>)>, PageError> {
    let Sending { compress: mode, link_hint, at_once } = how;
    if at_once == 0 {
        return Err(PageError::BadSendRanges { why: "0 streams sending at once; at least 1 must".into() });
    }
    if fds.is_empty() || fds.len() > MAX_STREAMS {
        return Err(PageError::BadSendRanges { why: format!("{} streams; 1 to {MAX_STREAMS} may be used", fds.len()) });
    }
    if let Some(m) = meter {
        for chunk in chunks {
            let s = super::BatchStats::of(chunk);
            m.add_total(s.data_pages + s.zero_pages, s.data_pages);
        }
    }
    mark_panics();
    let next = AtomicUsize::new(0);
    // Bytes of the chunks whose turns came back: what decides whether the streams past the first
    // `at_once` stand down.
    let moved = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_failure = AtomicUsize::new(usize::MAX);
    let turns = &Turns::new(at_once.min(fds.len()), SLOW_TURNS);
    // Streams writing a chunk now, and the most at once: never more than `at_once` unless opened.
    #[cfg(test)]
    let (sending, most) = (&AtomicUsize::new(0), &AtomicUsize::new(0));
    let results: Vec<Result<(BatchTotals, Option<Compressor>), PageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = fds
            .iter()
            .enumerate()
            .map(|(index, &fd)| {
                let fd: Link<'a> = fd.into();
                let (next, failed, first_failure, moved) = (&next, &failed, &first_failure, &moved);
                scope.spawn(move || {
                    let mut totals = BatchTotals::default();
                    let mut compressor = (mode != CompressMode::Off).then(|| Compressor::new(mode, link_hint));
                    let outcome = (|| {
                        // A stream past the first `at_once` carries nothing this round, unless
                        // the turns open for slowness first.
                        let standing_down = index >= at_once
                            && turns.stands_down(|| {
                                failed.load(Ordering::Relaxed)
                                    || moved.load(Ordering::Relaxed) >= STAND_DOWN_BYTES
                                    || next.load(Ordering::Relaxed) >= chunks.len()
                            });
                        while !failed.load(Ordering::Relaxed) {
                            // Held while this chunk (or the end marker) is written.
                            let turn = turns.take();
                            // Dropped before the turn, also when this thread panics.
                            let _unwinding = FailOnUnwind::new(failed, first_failure, index);
                            if failed.load(Ordering::Relaxed) {
                                break;
                            }
                            #[cfg(test)]
                            let _sending = tests::Writing::count(sending, most, at_once, turns);
                            let i = if standing_down { usize::MAX } else { next.fetch_add(1, Ordering::Relaxed) };
                            let wire_before = totals.stats.wire_bytes;
                            #[cfg(test)]
                            tests::panic_if_asked(chunks, i);
                            let sent = match chunks.get(i) {
                                // The end-of-round marker: an empty batch.
                                None => send_batch_metered(fd, mem, &[], None, meter).map(|_| true),
                                Some(chunk) => match compressor.as_mut() {
                                    Some(c) => c.send_ranges(fd, mem, chunk, tracker, |s| {
                                        progress::advance(meter, s.data_pages + s.zero_pages, s.data_pages, s.wire_bytes);
                                        totals.add(s)
                                    }),
                                    None => send_batch_metered(fd, mem, chunk, tracker, meter).map(|s| totals.add(s)),
                                }
                                .map(|()| false),
                            };
                            match sent {
                                Ok(true) => return Ok(()),
                                Ok(false) => {
                                    moved.fetch_add(totals.stats.wire_bytes - wire_before, Ordering::Relaxed);
                                    #[cfg(test)]
                                    drop(_sending);
                                    drop(turn);
                                }
                                Err(err) => {
                                    // Flagged before the turn goes on, so the stream it goes to
                                    // sees the failure and writes nothing more: a stalled peer
                                    // fails the round after one timeout, not one per stream.
                                    failed.store(true, Ordering::Relaxed);
                                    let _ = first_failure.compare_exchange(usize::MAX, index, Ordering::AcqRel, Ordering::Acquire);
                                    return Err(err);
                                }
                            }
                        }
                        Ok(())
                    })();
                    outcome.map(|()| (totals, compressor)).map_err(|err| on_stream(index, err))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(index, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(PageError::io(
                        format!("stream {index}: the sending thread panicked"),
                        std::io::Error::from(std::io::ErrorKind::Other),
                    ))
                })
            })
            .collect()
    });
    #[cfg(test)]
    tests::MOST_WRITING.with(|m| m.set(most.load(Ordering::SeqCst)));
    #[cfg(test)]
    tests::OPENED.with(|o| o.set(turns.open()));
    // The stream that failed first names the cause; the others' errors are its consequences.
    let first = first_failure.load(Ordering::Acquire);
    let mut out = Vec::with_capacity(results.len());
    let mut error = None;
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(t) => out.push(t),
            Err(e) if index == first || (first == usize::MAX && error.is_none()) => error = Some(e),
            Err(_) => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Held by a stream's thread while it holds a turn: if the thread panics (a bug), the round is
/// failed, naming this stream, before the turn goes on, as an error is. Without it the other
/// streams would carry every chunk left before the panic surfaced at the join, and the next
/// stream would start a chunk the receivers can no longer use.
///
/// The process's panic hook runs before the unwinding, and printing a backtrace there can take
/// longer than [`SLOW_TURNS`], after which the turns open and the other streams go on. So the
/// guard also registers the round with this thread, and a hook put in front of whatever hook
/// the process has ([`mark_panics`]) marks it failed first. Should something replace that hook
/// later, the drop still marks it, as the thread unwinds.
struct FailOnUnwind<'a> {
    failed: &'a AtomicBool,
    first_failure: &'a AtomicUsize,
    index: usize,
}

impl<'a> FailOnUnwind<'a> {
    fn new(failed: &'a AtomicBool, first_failure: &'a AtomicUsize, index: usize) -> FailOnUnwind<'a> {
        HOLDING_TURN.with(|h| h.set(Some((failed as *const AtomicBool, first_failure as *const AtomicUsize, index))));
        FailOnUnwind { failed, first_failure, index }
    }
}

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        HOLDING_TURN.with(|h| h.set(None));
        if std::thread::panicking() {
            mark_failed(self.failed, self.first_failure, self.index);
        }
    }
}

fn mark_failed(failed: &AtomicBool, first_failure: &AtomicUsize, index: usize) {
    failed.store(true, Ordering::Relaxed);
    let _ = first_failure.compare_exchange(usize::MAX, index, Ordering::AcqRel, Ordering::Acquire);
}

thread_local! {
    /// The round this thread holds a turn of (its failure flags and its stream), set and cleared
    /// by [`FailOnUnwind`], which outlives every use: the hook reads it on this thread, before
    /// the unwinding that drops the guard.
    static HOLDING_TURN: std::cell::Cell<Option<(*const AtomicBool, *const AtomicUsize, usize)>> = const { std::cell::Cell::new(None) };
}

/// Put a hook in front of the process's panic hook, once: a thread that panics while it holds a
/// turn marks its round failed before the rest of the hook runs.
fn mark_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(Some((failed, first_failure, index))) = HOLDING_TURN.try_with(|h| h.get()) {
                // SAFETY: set by a FailOnUnwind of this thread, which is alive until the
                // unwinding this hook precedes, and so are the flags it borrows.
                unsafe { mark_failed(&*failed, &*first_failure, index) };
            }
            before(info)
        }));
    });
}

/// How much of a round must go, turns taken and given back, before the streams past the first
/// `at_once` stand down ([`Turns::stands_down`]): more than the buffers between here and a peer
/// can take at once (a tunnel's or proxy's on this host as well as the sockets'), so that what
/// went quickly went at the speed of the link, not of the buffers. On one host 64 MiB take 15-20
/// ms; through a tunnel whose buffers took the first chunks the later ones are slow, and the
/// turns open ([`SLOW_TURNS`]) before this much has gone.
const STAND_DOWN_BYTES: u64 = 64 << 20;

/// How long the streams may go without one of them finishing a chunk before every stream may send
/// at once. On one host a 16 MiB chunk takes milliseconds (4-16 ms at 1-4 GiB/s); a chunk that
/// takes longer is waiting on the network (a tunnel to another host looks like this host by its
/// addresses), where streams waiting for their turn would leave the link idle and their
/// receivers waiting, under their receive timeout, for the next batch.
const SLOW_TURNS: Duration = Duration::from_millis(100);

/// Turns to write a chunk: at most `at_once` held at a time, granted in the order they were asked
/// for (a ticket each), so no stream waits for more than the chunks of those ahead of it; and
/// every stream may go at once from when [`SLOW_TURNS`] pass with no turn given back until the
/// round ends. The streams past the first `at_once` ask whether to stand down first
/// ([`Turns::stands_down`]).
struct Turns {
    at_once: u64,
    /// [`SLOW_TURNS`], but in tests.
    slow: Duration,
    state: Mutex<TurnsState>,
    changed: Condvar,
}

struct TurnsState {
    /// Tickets given out.
    tickets: u64,
    /// Turns given back.
    returned: u64,
    /// When a turn was last given back (or the round began).
    last_returned: Instant,
    /// Every stream may go (the streams wait on the network).
    open: bool,
}

/// A turn, given back when dropped.
struct Turn<'t>(&'t Turns);

impl Turns {
    fn new(at_once: usize, slow: Duration) -> Turns {
        let state = TurnsState { tickets: 0, returned: 0, last_returned: Instant::now(), open: false };
        Turns { at_once: at_once as u64, slow, state: Mutex::new(state), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, TurnsState> {
        // A poisoned lock only means another stream's thread panicked holding it; the state is
        // still whole (each update is one statement).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Turn<'_> {
        let mut state = self.lock();
        let ticket = state.tickets;
        state.tickets += 1;
        // Ticket t goes once all but `at_once - 1` of the tickets before it have given theirs back.
        // Saturating: a later ticket may go and give its turn back before this thread wakes to
        // take the turn it was granted, and `returned + at_once` could overflow.
        while !state.open && ticket.saturating_sub(state.returned) >= self.at_once {
            state = self.wait(state);
        }
        Turn(self)
    }

    /// Wait for a turn to come back, at most [`SLOW_TURNS`]; if none has for that long, open the
    /// turns to every stream for the rest of the round.
    fn wait<'s>(&'s self, state: MutexGuard<'s, TurnsState>) -> MutexGuard<'s, TurnsState> {
        let mut state = self.changed.wait_timeout(state, self.slow).unwrap_or_else(|e| e.into_inner()).0;
        if !state.open && state.last_returned.elapsed() >= self.slow {
            state.open = true;
            self.changed.notify_all();
        }
        state
    }

    /// For a stream past the first `at_once`, before it takes a turn: whether it stands down for
    /// the round, carrying only the end of its share. It waits, looking again each time a turn
    /// comes back, until `enough()` (the caller's: [`STAND_DOWN_BYTES`] went, every chunk is
    /// taken, or the round failed), when it stands down, or until the turns open for slowness
    /// (the streams wait on a network: it goes with the others).
    ///
    /// Alternating four streams two at a time ran a warm 1 GiB round 30 % slower on 2 CPUs than
    /// two streams did, and these two carrying it all ran it as fast as two streams: A/B in
    /// docs/performance.md, session 42. The streams that stand down end their share once the
    /// first 64 MiB are in, so their receivers wait milliseconds on one host; were they to wait
    /// for chunks they never get, a round longer than the destination's receive timeout would
    /// fail them.
    fn stands_down(&self, enough: impl Fn() -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if state.open {
                return false;
            }
            if enough() {
                return true;
            }
            state = self.wait(state);
        }
    }

    #[cfg(test)]
    fn open(&self) -> bool {
        self.lock().open
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.returned += 1;
        state.last_returned = Instant::now();
        drop(state);
        self.0.changed.notify_all();
    }
}

/// The pages one round may carry over all its streams together (a round sends each page at most
/// once, so at most the guest's page count). Shared by the streams' receivers, charged after
/// every batch.
#[derive(Debug)]
pub struct PageBudget {
    max: u64,
    carried: AtomicU64,
}

impl PageBudget {
    pub fn new(max: u64) -> PageBudget {
        PageBudget { max, carried: AtomicU64::new(0) }
    }

    /// Charge `pages`; [`PageError::RoundTooLarge`] once the round has carried more than `max`.
    pub fn charge(&self, pages: u64) -> Result<(), PageError> {
        let carried = self.carried.fetch_add(pages, Ordering::Relaxed).saturating_add(pages);
        if carried > self.max {
            return Err(PageError::RoundTooLarge { carried, max: self.max });
        }
        Ok(())
    }

    pub fn carried(&self) -> u64 {
        self.carried.load(Ordering::Relaxed)
    }
}

/// Receive one stream's share of a round from `fd`: batches straight into guest memory (hashed
/// into `tracker` when given) until the empty batch that ends the share (what `send_chunks` and
/// a single-stream sender end it with). Every batch's pages are charged to `budget`; a compressed
/// batch is refused unless `compressed` (the stream agreed to it). Returns the non-empty batches'
/// totals, `wire_bytes` including the end marker. The first failure is returned as it happened
/// (a timeout names the peer); pages of batches already received stay written. `meter`, when
/// given, advances as the pages arrive (the streams of a round may share one). `streams`: how many
/// streams the round has. Its only stream installs big batches into fresh memory on a second
/// thread while this one reads; with several, the streams themselves keep the CPUs busy, and
/// each reads and installs in windows sized for how many share the CPUs ([`Install`]).
pub fn recv_share<'a>(
    link: impl Into<Link<'a>>,
    mem: &GuestMemory,
    tracker: Option<&DigestTracker>,
    budget: &PageBudget,
    compressed: bool,
    meter: Option<&Meter>,
    streams: usize,
) -> Result<BatchTotals, PageError> {
    let link = link.into();
    let mut totals = BatchTotals::default();
    // A round's batches install into one registration (`memory::install`), begun by the first big
    // batch and ended with the share, before the guest can run.
    let _holds: Vec<_> = mem.segments().iter().filter_map(|seg| seg.hold_install()).collect();
    // Both sized by the CPUs this process may use (`sched::usable_cpus`), once a share.
    let window = install_window_pages(streams);
    let installers = if streams <= 1 { pipeline_installers() } else { 1 }; // only a lone stream pipelines
    loop {
        // Refused before its payload is read or a guest byte written: compression the stream did
        // not agree to (the decompressor never sees it), pages beyond what the round may carry.
        let install =
            Install { from: INSTALL_MIN.saturating_sub(totals.stats.data_bytes), alone: streams <= 1, window, installers, there: false };
        let stats = recv_batch_admitted(link, mem, tracker, meter, install, |batch| {
            if batch.compressed_batches > 0 && !compressed {
                return Err(PageError::CompressionNotAgreed);
            }
            budget.charge(batch.data_pages + batch.zero_pages)
        })?;
        if stats.ranges == 0 {
            totals.stats.wire_bytes += stats.wire_bytes;
            return Ok(totals);
        }
        totals.add(stats);
    }
}

#[cfg(test)]
#[path = "streams_tests.rs"]
mod tests;
