//! The capabilities a served disk offers, as small traits combined into [`Disk`]; the NBD
//! server and the tools depend on these, not on how a chain is built.

use crate::error::Result;

/// What serves a byte range of the merged device (for `map` and NBD block status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data held by the layer at `depth` (0 = top; the raw base is the deepest).
    Data { depth: usize },
    /// Reads as zeros because the layer at `depth` says so (a whiteout).
    Zero { depth: usize },
    /// No layer holds anything here: reads as zeros.
    Unallocated,
}

impl ExtentKind {
    /// Whether the range reads as zeros without looking at data.
    pub fn reads_zero(self) -> bool {
        !matches!(self, ExtentKind::Data { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

pub trait DiskRead {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from device offset `offset`; the range must lie inside the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

pub trait DiskWrite {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
}

pub trait DiskZero {
    /// Makes the range read as zeros. With `allocate`, space is kept allocated (NBD NO_HOLE);
    /// otherwise the cheapest representation is used (a whiteout in the map).
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool) -> Result<()>;
    /// Whether [`DiskZero::write_zeroes`] with these arguments is a metadata-only operation.
    fn zeroing_is_fast(&self, allocate: bool) -> bool;
    /// Releases the range; afterwards it reads as zeros.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
}

pub trait DiskFlush {
    /// Makes every write completed before the call durable.
    fn flush(&self) -> Result<()>;
}

pub trait DiskExtents {
    /// Describes a prefix of [offset, offset+len) (at least one extent, at most `max_extents`).
    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>>;
}

/// A complete disk: what the NBD server exports.
pub trait Disk: DiskRead + DiskWrite + DiskZero + DiskFlush + DiskExtents + Send + Sync {
    fn is_read_only(&self) -> bool;
}
