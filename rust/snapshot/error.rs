//! The errors the memory file reports: each names the file offset, the guest-physical range or
//! the value at fault, and what was expected.

use std::fmt;
use std::io;

use crate::digest::PageError;
use crate::memory::{human_size, MemoryError};

#[derive(Debug)]
pub enum SnapshotError {
    /// An OS call on the memory file failed.
    Io {
        what: String,
        source: io::Error,
    },
    /// The file's size is not the guest's memory size.
    FileSize {
        size: u64,
        expected: u64,
    },
    /// The caller's list of expected chunk hashes does not fit the image.
    ChunkCount {
        got: usize,
        expected: usize,
        chunk_size: u64,
    },
    BadChunkSize {
        chunk_size: u64,
    },
    /// A chunk's bytes do not hash to what the checkpoint recorded.
    ChunkMismatch {
        index: usize,
        file_start: u64,
        file_end: u64,
        gpa_ranges: Vec<(u64, u64)>,
        mismatches: usize,
    },
    /// A live snapshot's write was cancelled (its caller asked it to stop).
    Cancelled,
    /// Eager restore into memory that maps a file.
    Unsupported {
        why: String,
    },
    Memory(MemoryError),
    Page(PageError),
}

impl SnapshotError {
    pub(crate) fn io(what: impl Into<String>) -> SnapshotError {
        SnapshotError::Io { what: what.into(), source: io::Error::last_os_error() }
    }

    pub fn errno(&self) -> i32 {
        match self {
            SnapshotError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            SnapshotError::Memory(e) => e.errno(),
            SnapshotError::Page(e) => e.errno(),
            SnapshotError::Unsupported { .. } => libc::ENOTSUP,
            SnapshotError::Cancelled => libc::ECANCELED,
            SnapshotError::BadChunkSize { .. } | SnapshotError::ChunkCount { .. } => libc::EINVAL,
            SnapshotError::FileSize { .. } | SnapshotError::ChunkMismatch { .. } => libc::EBADMSG,
        }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Io { what, source } => write!(f, "{what}: {source}"),
            SnapshotError::FileSize { size, expected } => write!(
                f,
                "memory file is {size} bytes ({}), the guest's memory is {expected} bytes ({})",
                human_size(*size),
                human_size(*expected)
            ),
            SnapshotError::ChunkCount { got, expected, chunk_size } => {
                write!(f, "{got} chunk hashes given, but the memory image has {expected} chunks of {chunk_size} bytes")
            }
            SnapshotError::BadChunkSize { chunk_size } => {
                write!(f, "chunk size {chunk_size} is not a positive multiple of the 4096-byte page")
            }
            SnapshotError::ChunkMismatch { index, file_start, file_end, gpa_ranges, mismatches } => {
                let gpas: Vec<String> = gpa_ranges.iter().map(|(a, b)| format!("{a:#x}..{b:#x}")).collect();
                write!(
                    f,
                    "memory chunk {index} (file bytes {file_start:#x}..{file_end:#x}, guest-physical {}) does not match its recorded hash",
                    gpas.join(" and ")
                )?;
                if *mismatches > 1 {
                    write!(f, " ({mismatches} chunks differ in all)")?;
                }
                Ok(())
            }
            SnapshotError::Unsupported { why } => f.write_str(why),
            SnapshotError::Cancelled => f.write_str("the live checkpoint was cancelled"),
            SnapshotError::Memory(e) => e.fmt(f),
            SnapshotError::Page(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SnapshotError {}

impl From<MemoryError> for SnapshotError {
    fn from(e: MemoryError) -> SnapshotError {
        SnapshotError::Memory(e)
    }
}

impl From<PageError> for SnapshotError {
    fn from(e: PageError) -> SnapshotError {
        match e {
            PageError::Memory(m) => SnapshotError::Memory(m),
            other => SnapshotError::Page(other),
        }
    }
}
