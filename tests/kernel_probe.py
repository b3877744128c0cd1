"""Does this kernel offer what the kernel dirty backend needs? Asked of the kernel directly.

The tests decide whether to skip the kernel backend here, never by asking vmmpy: vmmpy's own
self-check (and "auto") falls back to the soft backend when its tracker misbehaves, so a broken
tracker would turn its tests into skips. This probe only asks whether the features exist (Linux
6.7+, a userfaultfd that accepts asynchronous write-protect, and the PAGEMAP_SCAN ioctl); where
they do, the kernel-backend tests run and a broken backend fails them.

The numbers are the kernel's ABI (include/uapi/linux/userfaultfd.h and fs.h), generic ioctl
encoding as on x86_64 and aarch64.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re

USERFAULTFD_IOC_NEW = 0xAA00
UFFDIO_API = 0xC018_AA3F
UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
PAGEMAP_SCAN = 0xC060_6610
PAGE_IS_PRESENT = 1 << 3
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
PAGE = 4096


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
                                                     "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _error(what: str) -> str:
    err = ctypes.get_errno()
    return f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})"


def _open_userfaultfd() -> tuple[int | None, str]:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        dev_why = f"/dev/userfaultfd: {err.strerror}"
    else:
        try:
            fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
            if fd >= 0:
                return fd, ""
            dev_why = _error("USERFAULTFD_IOC_NEW")
        finally:
            os.close(dev)
    number = SYS_USERFAULTFD.get(platform.machine())
    if number is None:
        return None, f"{dev_why}; no userfaultfd syscall number known for {platform.machine()}"
    fd = _libc.syscall(number, flags)
    if fd >= 0:
        return fd, ""
    return None, f"{dev_why}; {_error('userfaultfd(2)')}"


def _pagemap_scan_works() -> str | None:
    """None when PAGEMAP_SCAN reports the one page written in a scratch mapping."""
    addr = _libc.mmap(None, 4 * PAGE, 0x1 | 0x2, 0x02 | 0x20, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    if addr in (None, ctypes.c_void_p(-1).value):
        return _error("mmap")
    try:
        ctypes.memset(addr + PAGE, 1, 1)
        regions = (_PageRegion * 4)()
        arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg), start=addr, end=addr + 4 * PAGE, vec=ctypes.addressof(regions),
                         vec_len=4, category_mask=PAGE_IS_PRESENT, return_mask=PAGE_IS_PRESENT)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            n = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.addressof(arg))
        finally:
            os.close(fd)
        if n < 0:
            return _error("PAGEMAP_SCAN on /proc/self/pagemap")
        found = [(r.start - addr, r.end - addr) for r in regions[:n]]
        if found != [(PAGE, 2 * PAGE)]:
            return f"PAGEMAP_SCAN answered but did not report the one present page (got {found})"
        return None
    finally:
        _libc.munmap(addr, 4 * PAGE)


def kernel_dirty_tracking_unavailable_reason() -> str | None:
    """None when this kernel offers userfaultfd asynchronous write-protect and PAGEMAP_SCAN to
    this process; otherwise why not."""
    release = platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m or (int(m[1]), int(m[2])) < (6, 7):
        return f"Linux {release} is older than 6.7 (no UFFD_FEATURE_WP_ASYNC, no PAGEMAP_SCAN)"
    fd, why = _open_userfaultfd()
    if fd is None:
        return f"cannot open a userfaultfd ({why})"
    try:
        api = _UffdioApi(api=UFFD_API, features=UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
        if _libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
            return _error("UFFDIO_API with UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED")
    finally:
        os.close(fd)
    return _pagemap_scan_works()
