//! Where each segment of a guest lies in the memory file: the image is the segments in
//! guest-physical order, back to back, so the 3-4 GiB hole takes no file space.

use std::sync::Arc;

use crate::memory::{GuestMemory, MemoryError, Segment};

/// The segments of a guest and the file offset each starts at.
pub struct ImageLayout {
    parts: Vec<(Arc<Segment>, u64)>,
    total: u64,
}

impl ImageLayout {
    pub fn of(mem: &GuestMemory) -> Result<ImageLayout, MemoryError> {
        let mut parts = Vec::with_capacity(mem.segments().len());
        let mut offset = 0u64;
        for seg in mem.segments() {
            if seg.is_closed() {
                return Err(MemoryError::Closed { segment: seg.name().to_string() });
            }
            parts.push((seg.clone(), offset));
            offset += seg.size() as u64;
        }
        Ok(ImageLayout { parts, total: offset })
    }

    /// The image's size: the sum of the segments' sizes (lowmem + highmem).
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn segments(&self) -> impl Iterator<Item = (&Arc<Segment>, u64)> {
        self.parts.iter().map(|(s, o)| (s, *o))
    }

    /// Call `f(segment, offset in segment, length)` for each piece of image bytes `start..end`,
    /// in order, split where a segment ends.
    pub fn for_each_part<E>(&self, start: u64, end: u64, mut f: impl FnMut(&Arc<Segment>, usize, usize) -> Result<(), E>) -> Result<(), E> {
        for (seg, file_off) in &self.parts {
            let seg_end = file_off + seg.size() as u64;
            let (a, b) = (start.max(*file_off), end.min(seg_end));
            if a < b {
                f(seg, (a - file_off) as usize, (b - a) as usize)?;
            }
        }
        Ok(())
    }

    /// The guest-physical ranges `(start, end)` that image bytes `start..end` hold.
    pub fn gpa_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let _ = self.for_each_part::<()>(start, end, |seg, off, len| {
            let gpa = seg.gpa().0 + off as u64;
            out.push((gpa, gpa + len as u64));
            Ok(())
        });
        out
    }
}
