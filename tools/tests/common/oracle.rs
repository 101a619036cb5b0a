//! What each 512-byte sector of a device may read after a crash or a failed write (spec §5.5):
//! its value at the last completed FLUSH, or a value some write issued since gave it.

use std::collections::HashSet;

pub const SECTOR: usize = 512;

/// FNV-1a: the oracle keeps hashes of sector values, not the values.
pub fn sector_hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
}

/// The sectors `[off, off + len)` touches.
fn sectors(off: usize, len: usize) -> std::ops::Range<usize> {
    off / SECTOR..(off + len).div_ceil(SECTOR)
}

pub struct Oracle {
    durable: Vec<u64>,
    since: Vec<HashSet<u64>>,
}

impl Oracle {
    /// A device whose every sector is durable as `contents` holds it.
    pub fn new(contents: &[u8]) -> Oracle {
        let durable: Vec<u64> = contents.chunks(SECTOR).map(sector_hash).collect();
        let since = vec![HashSet::new(); durable.len()];
        Oracle { durable, since }
    }

    /// A write over `[off, off + len)` was issued (whether it completed, failed or was cut
    /// short): `model` holds the device as that write leaves it.
    pub fn written(&mut self, model: &[u8], off: usize, len: usize) {
        for s in sectors(off, len) {
            self.since[s].insert(sector_hash(&model[s * SECTOR..((s + 1) * SECTOR).min(model.len())]));
        }
    }

    /// A FLUSH completed: the device as `model` holds it is durable. Only sectors written
    /// since the last one can have changed (every change to `model` goes through
    /// [`Oracle::written`]), so only they are hashed again.
    pub fn flushed(&mut self, model: &[u8]) {
        for (s, since) in self.since.iter_mut().enumerate().filter(|(_, w)| !w.is_empty()) {
            self.durable[s] = sector_hash(&model[s * SECTOR..((s + 1) * SECTOR).min(model.len())]);
            since.clear();
        }
    }

    /// Panics naming the first sector of `now` (the whole device as read back) that holds
    /// neither its flushed value nor one written since.
    #[track_caller]
    pub fn check(&self, now: &[u8], what: &str) {
        self.check_allowing(now, what, |_, _| false);
    }

    /// As [`Oracle::check`], on a device still open after a sync failed (spec §5.3): the
    /// kernel may have dropped pages it could not write, so a sector written since the last
    /// completed FLUSH may also read as zeros (the never-written space its new slot has on
    /// the medium). Every sector a completed FLUSH covered must still read exactly so.
    #[track_caller]
    pub fn check_after_failed_sync(&self, now: &[u8], what: &str) {
        const ZEROS: [u8; SECTOR] = [0; SECTOR];
        let zero = sector_hash(&ZEROS);
        self.check_allowing(now, what, |s, h| h == zero && !self.since[s].is_empty());
    }

    #[track_caller]
    fn check_allowing(&self, now: &[u8], what: &str, also: impl Fn(usize, u64) -> bool) {
        assert_eq!(now.len().div_ceil(SECTOR), self.durable.len(), "{what}: device size");
        for (s, bytes) in now.chunks(SECTOR).enumerate() {
            let h = sector_hash(bytes);
            assert!(
                h == self.durable[s] || self.since[s].contains(&h) || also(s, h),
                "{what}: sector {s} (byte {}) reads a value that was neither flushed nor written since \
                 (it reads zeros: {}; values written since the last flush: {}; its first bytes: {:02x?})",
                s * SECTOR,
                bytes.iter().all(|&b| b == 0),
                self.since[s].len(),
                &bytes[..16.min(bytes.len())]
            );
        }
    }
}

/// The sector-aligned span `[start, end)` covering `[off, off + len)`.
pub fn sector_span(off: u64, len: u64) -> (u64, u64) {
    let s = SECTOR as u64;
    (off / s * s, (off + len).div_ceil(s) * s)
}

/// After a write failed: `now`, `before` and `after` hold the same sector-aligned span of the
/// device as read back, as it was before the write and as the write would have left it. Every
/// sector must read as before or as after; returns the index of the first that reads neither.
pub fn first_mixed_sector(now: &[u8], before: &[u8], after: &[u8]) -> Option<usize> {
    (0..now.len().div_ceil(SECTOR)).find(|&s| {
        let r = s * SECTOR..((s + 1) * SECTOR).min(now.len());
        now[r.clone()] != before[r.clone()] && now[r.clone()] != after[r]
    })
}
