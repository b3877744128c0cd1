//! Guest-physical addresses as a newtype, so a GPA is never confused with an offset or a length.

use std::fmt;

/// The page size vmmpy tracks, saves and migrates in. Guest memory creation checks that the host
/// agrees (`sysconf(_SC_PAGESIZE)`), because the dirty bitmap and the kernel backend assume it.
pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    /// `self + len`, or `None` when it would overflow the 64-bit guest-physical space.
    pub fn checked_add(self, len: u64) -> Option<GuestAddress> {
        self.0.checked_add(len).map(GuestAddress)
    }

    /// The page frame number (`gpa >> 12`).
    pub fn pfn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }

    pub fn from_pfn(pfn: u64) -> GuestAddress {
        GuestAddress(pfn << PAGE_SHIFT)
    }

    pub fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE as u64 - 1) == 0
    }
}

impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// "512 MiB", "3 GiB", "4 KiB", "123 B": sizes in error messages people read.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, scale) in UNITS {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{} {}", bytes / scale, unit);
        }
    }
    for (unit, scale) in UNITS {
        if bytes >= scale {
            return format!("{:.1} {}", bytes as f64 / scale as f64, unit);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfn_round_trips_and_overflow_is_caught() {
        assert_eq!(GuestAddress(0x1_0000_1234).pfn(), 0x0010_0001);
        assert_eq!(GuestAddress::from_pfn(0x100001), GuestAddress(0x1_0000_1000));
        assert_eq!(GuestAddress(u64::MAX - 1).checked_add(2), None);
        assert!(GuestAddress(0x2000).is_page_aligned());
        assert!(!GuestAddress(0x2001).is_page_aligned());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(512 << 20), "512 MiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size((1 << 20) + 1), "1.0 MiB");
    }
}
