//! The userfaultfd(2) ABI, written once: the ioctl numbers and structs of <linux/userfaultfd.h>
//! that the kernel dirty backend (`dirty::kernel`, write-protect) and page installation
//! (`memory::install`, missing pages) use, and opening a userfaultfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// The ioctls are _IOWR/_IOR(0xAA, nr, struct).
pub(crate) const UFFD_API: u64 = 0xAA;
pub(crate) const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
pub(crate) const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
pub(crate) const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
pub(crate) const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
pub(crate) const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
pub(crate) const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
pub(crate) const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 2;
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
pub(crate) struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, `arg.pagefault.address` is at offset 16.
#[repr(C)]
pub(crate) struct UffdMsg {
    pub event: u8,
    pub reserved: [u8; 7],
    pub flags: u64,
    pub address: u64,
    pub rest: u64,
}

/// A new non-blocking userfaultfd, or why none could be had. /dev/userfaultfd (Linux 6.1+) works
/// for whoever may open it; the syscall needs vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE.
/// Both are tried; the error names both reasons.
pub(crate) fn open() -> Result<OwnedFd, String> {
    let dev_err = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags and returns a new fd.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, libc::O_CLOEXEC | libc::O_NONBLOCK) };
            if fd >= 0 {
                // SAFETY: the ioctl returned a fresh fd that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            format!("USERFAULTFD_IOC_NEW: {}", std::io::Error::last_os_error())
        }
        Err(e) => format!("/dev/userfaultfd: {e}"),
    };
    // SAFETY: the userfaultfd syscall takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: a fresh fd that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    Err(format!(
        "cannot open a userfaultfd ({dev_err}; userfaultfd(2): {}); it needs access to /dev/userfaultfd or vm.unprivileged_userfaultfd=1",
        std::io::Error::last_os_error()
    ))
}

/// UFFDIO_API with `features`, or the kernel's reason for refusing them.
pub(crate) fn handshake(uffd: &OwnedFd, features: u64) -> std::io::Result<()> {
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes the struct we pass, on a userfaultfd the caller owns.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Register `len` bytes at `start` (page-aligned, a mapping of this process) in `mode`.
pub(crate) fn register(uffd: &OwnedFd, start: u64, len: u64, mode: u64) -> std::io::Result<()> {
    let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
    // SAFETY: registering a range of the caller's own mapping on its userfaultfd.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unregister `len` bytes at `start`; failure only means they were not registered. Faults still
/// waiting on the range are woken and retried as ordinary faults.
pub(crate) fn unregister(uffd: &OwnedFd, start: u64, len: u64) {
    let mut range = UffdioRange { start, len };
    // SAFETY: unregistering the caller's own range.
    unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) };
}
