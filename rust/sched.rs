//! The host scheduler's slice for a thread: how long it may run before a waking thread of its
//! core gets its turn.
//!
//! Linux's EEVDF scheduler (6.12 and later) lets a normal thread ask for a shorter slice than the
//! default (`sched_attr.sched_runtime`, clamped to 0.1-100 ms; 0 asks for the default again),
//! and a thread with the shorter slice preempts a longer-sliced one when it wakes. A
//! thread that must answer at once (a migration's downtime: pause, last pages, state, resume)
//! then waits about 0.1 ms behind a busy neighbour instead of the rest of the neighbour's slice.
//! No privilege is needed, the thread's CPU share is unchanged, and kernels without it ignore
//! the field. Policy (which threads, when) is the caller's.

use std::io;
use std::sync::OnceLock;

/// The CPUs this process may run on (`std::thread::available_parallelism`: its affinity and its
/// cgroup's quota), asked of the kernel once per process. Each ask reads `/proc/self/cgroup` and
/// the cgroup's `cpu.max`, about 30 µs here, and the receive path sizes every round's windows and
/// installers by it, inside a live migration's downtime too: a stream's receive of an empty round
/// took 33-41 µs with the ask and about 5 without (session 38). A process moved to more or fewer
/// CPUs afterwards keeps the count it started with, which only sizes windows and threads.
pub fn usable_cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The shortest slice the kernel grants (it clamps shorter requests up to it).
pub const MIN_SLICE_NS: u64 = 100_000;

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;
const SCHED_FLAG_RESET_ON_FORK: u64 = 1;

fn get_attr(tid: i32) -> io::Result<libc::sched_attr> {
    // SAFETY: a zeroed sched_attr (plain integers) is a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: `attr` is ours and `size` bytes long; the kernel writes at most that much.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, &mut attr as *mut libc::sched_attr, size, 0u32) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// The slice thread `tid` (0: the calling thread) runs with, in nanoseconds, or None when its
/// policy is not a normal one (real-time, deadline, idle), whose slices this module leaves alone.
pub fn slice(tid: i32) -> io::Result<Option<u64>> {
    let attr = get_attr(tid)?;
    Ok(matches!(attr.sched_policy, SCHED_OTHER | SCHED_BATCH).then_some(attr.sched_runtime))
}

/// Ask for a slice of `slice_ns` for thread `tid` (0: the calling thread); 0 asks for the
/// scheduler's default. Its policy, nice value and reset-on-fork flag are kept. Returns the
/// slice it had, or None (and changes nothing) for a thread whose policy is not a normal one.
pub fn set_slice(tid: i32, slice_ns: u64) -> io::Result<Option<u64>> {
    let mut attr = get_attr(tid)?;
    if !matches!(attr.sched_policy, SCHED_OTHER | SCHED_BATCH) {
        return Ok(None);
    }
    let before = attr.sched_runtime;
    attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.sched_runtime = slice_ns;
    attr.sched_deadline = 0;
    attr.sched_period = 0;
    // SAFETY: `attr` is a complete sched_attr of the size it declares, read by the kernel only.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const libc::sched_attr, 0u32) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(before))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usable_cpus_are_what_the_kernel_says_and_asked_once() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(usable_cpus(), cpus);
        // Asked again from another thread: the same count, from the cache (the kernel's answer
        // does not change here, so only the figure is checked, not where it came from).
        assert_eq!(std::thread::spawn(usable_cpus).join().unwrap(), cpus);
    }

    #[test]
    fn a_thread_asks_for_a_short_slice_and_back_and_its_new_threads_inherit_it() {
        let before = slice(0).unwrap().expect("tests run under a normal policy");
        let set = std::thread::spawn(|| {
            // SAFETY: getpriority reads the calling thread's nice value (per thread on Linux).
            let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let was = nice();
            let had = slice(0).unwrap();
            assert_eq!(set_slice(0, MIN_SLICE_NS).unwrap(), had, "the slice it had is returned");
            let mine = slice(0).unwrap();
            let child = std::thread::spawn(|| slice(0).unwrap()).join().unwrap();
            assert_eq!(set_slice(0, 0).unwrap(), mine, "the slice it had is returned");
            assert_eq!(nice(), was, "the nice value is kept");
            (mine, child, slice(0).unwrap())
        });
        let (mine, child, after) = set.join().unwrap();
        assert!(set_slice(i32::MAX, 0).is_err(), "no such thread");
        if before == 0 {
            // A kernel before 6.12 reports no slice and ignores the request.
            eprintln!("this kernel has no per-thread slices: only the calls were checked");
            return;
        }
        assert_eq!(mine, Some(MIN_SLICE_NS), "the slice asked for");
        assert_eq!(child, Some(MIN_SLICE_NS), "a thread started with the short slice inherits it");
        assert_eq!(after, Some(before), "asking for the default gives the scheduler's base slice back");
    }
}
