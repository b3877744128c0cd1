//! The errors guest memory reports. Each names the thing, the value and what was expected.

use std::fmt;

use super::address::{human_size, GuestAddress};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryError {
    /// No segment backs `gpa` (it may be in the 3-4 GiB hole or past the end of memory).
    Unmapped { gpa: GuestAddress, len: u64 },
    /// The access starts in a segment but runs past its end.
    CrossesSegment { gpa: GuestAddress, len: u64, segment: String, end: GuestAddress },
    /// An access by segment offset that does not lie inside the segment.
    OutOfSegment { segment: String, offset: u64, len: u64, size: u64 },
    /// A size that cannot be laid out (zero, not page-aligned, too large).
    BadSize { what: String, size: u64, why: String },
    /// mmap/mlock/madvise failed; `errno` is the OS error.
    Os { what: String, errno: i32, detail: String },
    /// Memory was closed: the mapping is on its way out and may not be used.
    Closed { segment: String },
    /// A requested dirty-tracking backend cannot run here.
    TrackerUnavailable { backend: String, why: String },
    /// A combination that cannot work (wired memory restored lazily).
    Unsupported { what: String, why: String },
    /// A chunk of lazily restored memory could not be loaded and checked, so it may not be used:
    /// `source` names where it comes from, `why` what was wrong.
    ChunkUnavailable { source: String, chunk: usize, file_start: u64, file_end: u64, gpa_ranges: Vec<(u64, u64)>, why: String, errno: i32 },
    /// Long work (wiring) stopped because the process was interrupted (the check given to
    /// [`super::set_interrupt_check`] said so): `what` says what was done of it. Nothing of it is kept.
    Interrupted { what: String },
}

impl MemoryError {
    pub fn os(what: impl Into<String>, detail: impl Into<String>) -> MemoryError {
        let err = std::io::Error::last_os_error();
        MemoryError::Os { what: what.into(), errno: err.raw_os_error().unwrap_or(0), detail: detail.into() }
    }

    /// The errno a kernel would answer with, for the ioctl layer.
    pub fn errno(&self) -> i32 {
        match self {
            MemoryError::Unmapped { .. } | MemoryError::CrossesSegment { .. } | MemoryError::OutOfSegment { .. } => libc::EFAULT,
            MemoryError::BadSize { .. } => libc::EINVAL,
            MemoryError::Os { errno, .. } => *errno,
            MemoryError::Closed { .. } => libc::EBADF,
            MemoryError::TrackerUnavailable { .. } | MemoryError::Unsupported { .. } => libc::ENOTSUP,
            MemoryError::ChunkUnavailable { errno, .. } => *errno,
            MemoryError::Interrupted { .. } => libc::EINTR,
        }
    }
}

fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::ENOMEM => "ENOMEM",
        libc::EPERM => "EPERM",
        libc::EAGAIN => "EAGAIN",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::ENOENT => "ENOENT",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        _ => return format!("errno {errno}"),
    };
    // io::Error's Display ends in " (os error N)", which the name already says.
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text.strip_suffix(&format!(" (os error {errno})")).unwrap_or(&text);
    format!("{name} ({text})")
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::Unmapped { gpa, len } => {
                write!(f, "guest address {gpa} (+{len} bytes) is not backed by any memory segment")
            }
            MemoryError::CrossesSegment { gpa, len, segment, end } => {
                write!(f, "guest access at {gpa} of {len} bytes crosses the end of segment '{segment}' at {end}")
            }
            MemoryError::OutOfSegment { segment, offset, len, size } => {
                write!(f, "access at offset {offset:#x} of {len} bytes does not fit segment '{segment}' ({size:#x} bytes)")
            }
            MemoryError::BadSize { what, size, why } => {
                write!(f, "{what} of {} ({size} bytes) {why}", human_size(*size))
            }
            MemoryError::Os { what, errno, detail } => {
                write!(f, "{what}: {}", errno_name(*errno))?;
                if !detail.is_empty() {
                    write!(f, "; {detail}")?;
                }
                Ok(())
            }
            MemoryError::Closed { segment } => write!(f, "segment '{segment}' was closed"),
            MemoryError::TrackerUnavailable { backend, why } => {
                write!(f, "dirty tracking backend '{backend}' is not available: {why}")
            }
            MemoryError::Unsupported { what, why } => write!(f, "{what} {why}"),
            MemoryError::Interrupted { what } => write!(f, "{what}"),
            MemoryError::ChunkUnavailable { source, chunk, file_start, file_end, gpa_ranges, why, .. } => {
                let gpas: Vec<String> = gpa_ranges.iter().map(|(a, b)| format!("{a:#x}..{b:#x}")).collect();
                write!(
                    f,
                    "{source}: memory chunk {chunk} (file bytes {file_start:#x}..{file_end:#x}, guest-physical {}) {why}; \
                     the guest may not use it",
                    gpas.join(" and ")
                )
            }
        }
    }
}

impl std::error::Error for MemoryError {}
