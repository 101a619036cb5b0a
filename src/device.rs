//! The capabilities a served disk offers, as small traits combined into [`Disk`]; the NBD
//! server and the tools depend on these, not on how a chain is built.

use crate::error::{err, ErrorKind, Result};
use crate::storage::Storage;

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

    /// The layer that decides what the range reads as, counted as qemu's `qemu:allocation-depth`
    /// counts it: 0 where no layer holds anything, 1 for the top, 2 and up for the layers
    /// below. A whiteout counts as held by the layer that records it (it hides everything
    /// below), as qemu counts a qcow2 zero cluster.
    pub fn allocation_depth(self) -> u32 {
        match self {
            ExtentKind::Data { depth } | ExtentKind::Zero { depth } => depth as u32 + 1,
            ExtentKind::Unallocated => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Appends `e` to `out`, merged into the last extent when it directly follows it and
/// `same(last kind, e's kind)` says they are one (the one place extents are merged).
pub fn push_extent(out: &mut Vec<Extent>, e: Extent, same: impl Fn(ExtentKind, ExtentKind) -> bool) {
    if e.length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.end() == e.offset && same(last.kind, e.kind) => last.length += e.length,
        _ => out.push(e),
    }
}

/// Every extent of [offset, offset+len) of `disk`, in order, covering all of it (a device may
/// describe a range in several calls), neighbours of the same kind merged.
pub fn extents_of(disk: &dyn DiskExtents, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let part = disk.extents(pos, end - pos, 1 << 16)?;
        let Some(last) = part.last() else { break };
        pos = last.end();
        for e in part {
            push_extent(&mut out, e, |a, b| a == b);
        }
    }
    Ok(out)
}

pub trait DiskRead {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from device offset `offset`; the range must lie inside the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// The bytes of one write, taken strictly in order. They may still be on their way in (an NBD
/// write's payload still in its socket), so a disk can move them into storage without staging
/// the whole write in memory first.
pub trait Payload {
    /// Makes the next bytes ready to take without waiting for their sender: waits until `min`
    /// are (fewer only where a buffer on the way is full), then adds what is there already, up
    /// to `max`, and returns how many are ready. Called before taking locks, so that a slow
    /// sender does not keep them held.
    fn ready(&mut self, min: usize, max: usize) -> Result<usize>;
    /// Takes the next `buf.len()` bytes into `buf`.
    fn take(&mut self, buf: &mut [u8]) -> Result<()>;
    /// Takes the next `n` bytes and returns them, in `scratch` unless they are in memory
    /// already (then they are lent, not copied).
    fn take_bytes<'s>(&'s mut self, n: usize, scratch: &'s mut Vec<u8>) -> Result<&'s [u8]> {
        scratch.resize(n, 0);
        self.take(scratch)?;
        Ok(scratch)
    }
    /// Takes the next `len` bytes and writes them to `storage` at `offset`.
    fn take_to(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> Result<()>;
}

/// Bytes already in memory.
impl Payload for &[u8] {
    fn ready(&mut self, _min: usize, max: usize) -> Result<usize> {
        Ok(max.min(self.len()))
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        buf.copy_from_slice(split_front(self, buf.len())?);
        Ok(())
    }

    fn take_bytes<'s>(&'s mut self, n: usize, _scratch: &'s mut Vec<u8>) -> Result<&'s [u8]> {
        split_front(self, n)
    }

    fn take_to(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> Result<()> {
        storage.write_at(split_front(self, len)?, offset)
    }
}

/// The first `n` bytes of `s`, leaving the rest in `s`.
fn split_front<'a>(s: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if n > s.len() {
        return Err(err(ErrorKind::InvalidArgument, format!("{n} bytes asked of a payload of {}", s.len())));
    }
    let (head, rest) = s.split_at(n);
    *s = rest;
    Ok(head)
}

pub trait DiskWrite {
    /// Writes `buf` at device offset `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_from(&mut &buf[..], offset, buf.len() as u64)
    }
    /// Writes `len` bytes taken from `src` at `offset`. On error, some of them may not have
    /// been taken; the caller accounts for the rest.
    fn write_from(&self, src: &mut dyn Payload, offset: u64, len: u64) -> Result<()>;
    /// As [`DiskWrite::write_from`], returning only once the write is durable together with
    /// every write completed before it was called (NBD FUA; format-spec §5.3): at most the
    /// write followed by a flush.
    fn write_fua_from(&self, src: &mut dyn Payload, offset: u64, len: u64) -> Result<()>;
}

pub trait DiskZero {
    /// Makes the range read as zeros. With `allocate`, space is kept allocated (NBD NO_HOLE);
    /// otherwise the cheapest representation is used (a whiteout in the map).
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool) -> Result<()>;
    /// Whether [`DiskZero::write_zeroes`] with these arguments is a metadata-only operation
    /// (NBD FAST_ZERO: a server that would write data must refuse instead). The range is in
    /// bounds; the caller checked.
    fn zeroing_is_fast(&self, offset: u64, len: u64, allocate: bool) -> bool;
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

/// A stretch of the device that may have changed since an earlier layer, or has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub offset: u64,
    pub length: u64,
    /// Some layer above the earlier one records this range (as data or as zeros), so it may
    /// read differently now. `false`: it reads exactly as it did then.
    pub changed: bool,
}

impl Change {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Appends `c` to `out`, merged into the last change when it directly follows it and says the
/// same.
pub fn push_change(out: &mut Vec<Change>, c: Change) {
    if c.length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.end() == c.offset && last.changed == c.changed => last.length += c.length,
        _ => out.push(c),
    }
}

/// Which layer, as opposed to what it is called: a name can come to mean another layer (a
/// layer merged away, then a new snapshot given its file name), an identity cannot. A cowdisk
/// layer is its uuid (every layer made gets a new one: a snapshot's new top, a merge's
/// result); the raw base is the one at the bottom (a chain has at most one, and never gains
/// another while it is open: live operations keep it or merge it away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerId {
    Layer([u8; 16]),
    Base,
}

/// What a disk made of layers (a top over earlier, frozen ones) can say about them: the NBD
/// server's `qemu:dirty-bitmap:NAME` contexts. (Which layer serves each extent, for
/// `qemu:allocation-depth`, is [`ExtentKind`]'s depth, from [`DiskExtents`].)
///
/// A client names a layer once (when it selects the context) and is answered about that same
/// layer from then on, wherever it has moved in the chain, or, once it is no longer in the
/// chain, not at all (`None`): so a layer made later under the same name can never stand in
/// for it. A disk whose layers change while it is served (a snapshot taken live) answers each
/// call from one state of its chain.
pub trait DiskLayers {
    /// The layers below the top, nearest the top first, by name with their identity. A name
    /// is the file name (last path component) by which the layer above it names it; a name
    /// two layers share, or that is not UTF-8, is left out.
    fn snapshots(&self) -> Vec<(String, LayerId)>;
    /// Describes a prefix of [offset, offset+len) (at least one change, at most `max_extents`,
    /// neighbours that say the same merged): which ranges may read differently from the way
    /// they read in the layer `id`, when that layer was the top. `None` if that layer is no
    /// longer in the chain (merged away), or is not one layer (two layers with one uuid: a
    /// file copied into its own chain). Reads no data.
    fn changed_since(&self, id: LayerId, offset: u64, len: u64, max_extents: usize) -> Result<Option<Vec<Change>>>;
}

/// A complete disk: what the NBD server exports.
pub trait Disk: DiskRead + DiskWrite + DiskZero + DiskFlush + DiskExtents + Send + Sync {
    fn is_read_only(&self) -> bool;

    /// Its layers, if it is made of them (without, the NBD server offers no dirty bitmaps). A
    /// disk that wraps another, or swaps the chain it serves, implements [`DiskLayers`] by
    /// asking the current inner disk at each call, and returns itself here.
    fn layers(&self) -> Option<&dyn DiskLayers> {
        None
    }
}
