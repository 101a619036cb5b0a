//! Creating and opening an image: its header slots in the file (read, chosen, written next),
//! the journal a crash left replayed, the map and the allocator rebuilt, and the checks an
//! open makes before anyone reads through the map.

use super::alloc::Allocator;
use super::map::ChunkMap;
use super::{journal, used_ranges, write, Image, JournalState, OpenOptions, State, Written, STRIPES};
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::header::{Header, ParentRef};
use crate::format::{Geometry, BLOCK_SIZE, FLAG_CORRUPT, FLAG_DIRTY, FLAG_FROZEN, HEADER_AREA, HEADER_SLOT_SIZE};
use crate::storage::{FileStorage, LockMode, Storage};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

/// Sixteen random bytes from the kernel, for image UUIDs.
pub fn new_uuid() -> Result<[u8; 16]> {
    use std::io::Read;
    let mut u = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    // RFC 4122 version 4, variant 1, so the bytes print as a conventional UUID.
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

impl Image {
    /// Creates a new image file (which must not exist) and returns it open for writing.
    pub fn create(path: &Path, geom: Geometry, parent: Option<ParentRef>) -> Result<Image> {
        let storage = FileStorage::create(path)?;
        Image::create_on(Arc::new(storage), path, geom, parent, new_uuid()?)
    }

    /// Writes a new, closed image (both header slots clean) onto the empty `storage` and syncs
    /// it: what a tool that only needs the file (snapshot's new overlay) uses.
    pub fn create_closed_on(
        storage: &dyn Storage,
        path: &Path,
        geom: Geometry,
        parent: Option<ParentRef>,
    ) -> Result<()> {
        let ctx = |e: Error| e.with_file(path).during("create");
        let mut h = Header::new(geom, new_uuid()?, parent);
        h.generation = 0;
        storage.write_at(&h.encode(), 0).map_err(ctx)?;
        h.generation = 1;
        storage.write_at(&h.encode(), HEADER_SLOT_SIZE as u64).map_err(ctx)?;
        storage.sync().map_err(ctx)
    }

    /// Creates an image on any storage (which must be empty).
    pub fn create_on(
        storage: Arc<dyn Storage>,
        path: &Path,
        geom: Geometry,
        parent: Option<ParentRef>,
        uuid: [u8; 16],
    ) -> Result<Image> {
        // Both slots valid from the start: a clean generation 0 in slot 0, and generation 1 in
        // slot 1 marked dirty, since the image is returned open for writing.
        let mut h0 = Header::new(geom, uuid, parent);
        h0.generation = 0;
        let mut header = h0.clone();
        header.generation = 1;
        header.set_flag(FLAG_DIRTY, true);
        let ctx = |e: Error| e.with_file(path).during("create");
        storage.write_at(&h0.encode(), 0).map_err(ctx)?;
        storage.write_at(&header.encode(), HEADER_SLOT_SIZE as u64).map_err(ctx)?;
        storage.sync().map_err(ctx)?;
        let state = State {
            map: ChunkMap::empty(geom),
            alloc: Allocator::empty(geom.chunk_size(), geom.data_start()),
            header,
            extended_to: 0,
        };
        Ok(Image::assemble(path, storage, geom, true, state, 0, JournalState::default()))
    }

    fn assemble(
        path: &Path,
        storage: Arc<dyn Storage>,
        geom: Geometry,
        writable: bool,
        state: State,
        repaired: usize,
        journal: JournalState,
    ) -> Image {
        Image {
            path: path.to_path_buf(),
            storage,
            geom,
            writable: AtomicBool::new(writable),
            state: RwLock::new(state),
            flush_lock: Mutex::new(()),
            reclaim: RwLock::new(()),
            snapshot_gate: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            closing: AtomicBool::new(false),
            clean: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            corrupt_found: AtomicBool::new(false),
            repaired_on_open: repaired,
            journal: Mutex::new(journal),
            written: Mutex::new(Written::default()),
            copy_gate: RwLock::new(()),
        }
    }

    /// Opens an image file.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Image> {
        let storage = FileStorage::open(path, opts.write, opts.lock)?;
        Image::open_on(Arc::new(storage), path, opts)
    }

    /// Reads and validates the header and the whole map from `storage`.
    pub fn open_on(storage: Arc<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Image> {
        let ctx = |e: Error| e.with_file(path).during("open");
        let file_len = storage.len().map_err(ctx)?;
        let header = read_header(storage.as_ref(), file_len).map_err(ctx)?;
        // The flags are looked at before the journal is replayed: replaying writes (spec §5.9),
        // and a writer must not write to an image it may not open for writing (§2.2).
        if opts.write && header.has_flag(FLAG_FROZEN) && !opts.allow_frozen {
            return Err(ctx(err(
                ErrorKind::ReadOnly,
                "image is frozen (a read-only layer): open it read-only (`cowdisk serve --read-only`), or create an overlay on it to write (`cowdisk create NEW --backing IMAGE`)",
            )));
        }
        if opts.write && header.has_flag(FLAG_CORRUPT) && !opts.allow_corrupt {
            return Err(ctx(err(ErrorKind::Corrupt, "image is marked corrupt; run `cowdisk check --repair` first")));
        }
        let (storage, jstate) = replay_journal(storage, &header, opts.write, file_len).map_err(ctx)?;
        let file_len = storage.len().map_err(ctx)?;
        let geom = header.geometry;
        let mut map = ChunkMap::load(storage.as_ref(), geom, &header.map_extents, file_len).map_err(ctx)?;
        let repaired = map.drop_empty_slots();
        check_data_within_file(&map, file_len).map_err(ctx)?;
        let alloc = Allocator::rebuild(geom.chunk_size(), geom.data_start(), file_len, used_ranges(&map, &header))
            .map_err(ctx)?;
        let was_dirty = header.has_flag(FLAG_DIRTY);
        let state = State { header, map, alloc, extended_to: file_len };
        if !opts.write {
            return Ok(Image::assemble(path, storage, geom, false, state, repaired, jstate));
        }
        if was_dirty {
            // Unclean shutdown: unreferenced space may hold data written after the last flush.
            for &(s, e) in state.alloc.free_ranges() {
                storage.punch(s, e - s).map_err(ctx)?;
            }
        }
        let img = Image::assemble(path, storage, geom, true, state, repaired, jstate);
        // A failure poisons the half-opened image, so that its drop does not close it: a close
        // would write the next header after one whose durability failed (spec §2.4).
        {
            let mut st = write(&img.state);
            img.poisoning(img.write_header(&mut st, |h| h.set_flag(FLAG_DIRTY, true))).map_err(ctx)?;
        }
        img.sync_or_poison().map_err(ctx)?;
        Ok(img)
    }
}

/// The current header on `storage` (without reading the map).
pub fn read_header_of(storage: &dyn Storage) -> Result<Header> {
    read_header(storage, storage.len()?)
}

/// Brings the map in the file up to the last flush (spec §5.9): the records of the image's
/// journal that a crash left to replay are written to their places and synced, and a
/// checkpoint record says so, when the image is opened for writing; a reader that may not
/// write reads the file through the replayed bytes instead. Returns the store to use and
/// where the journal stands.
fn replay_journal(
    storage: Arc<dyn Storage>,
    header: &Header,
    write: bool,
    file_len: u64,
) -> Result<(Arc<dyn Storage>, JournalState)> {
    let Some(area) = header.journal else { return Ok((storage, JournalState::default())) };
    // A writer writes the whole area, and syncs, before a header lists it (spec §5.9), and a
    // file never shrinks: an area past the end means the file was cut short, and with it
    // perhaps map extents, whose lost sectors would read as empty (§4.3) without a word.
    if area.offset.checked_add(area.len).map_or(true, |end| end > file_len) {
        return Err(err(
            ErrorKind::Corrupt,
            format!("the journal area ends past the end of the file ({file_len} bytes): the file was cut short"),
        ));
    }
    let log = header.geometry.log;
    let chain = journal::Chain::read(storage.as_ref(), &area, &header.uuid, log)?;
    let patches = chain.patches(&header.map_extents, &area, header.geometry.data_start())?;
    if chain.to_replay().is_empty() {
        return Ok((storage, JournalState::after(&chain)));
    }
    if !write {
        return Ok((Arc::new(journal::Replayed::new(storage, patches)), JournalState::default()));
    }
    for (off, bytes) in &patches {
        storage.write_at(bytes, *off)?;
    }
    storage.sync()?;
    let seq = chain.next_seq();
    // With LOG, the mark names no place in the data area: the window there is free space now
    // (a writable open of a dirty image punches it), and a writer makes a new one.
    let layout = if log { journal::Layout::LogArea } else { journal::Layout::Area };
    let mark = journal::Record::checkpoint(seq, 0);
    storage.write_durable(&mark.encode(&header.uuid, layout), area.offset)?;
    let pos = area.offset + mark.len(layout) as u64;
    Ok((storage, JournalState { pos, next_seq: seq + 1, replay_from: seq + 1, ..Default::default() }))
}

/// The generation after `g`. Only a crafted header is at the largest (2^64 header writes):
/// wrapped to 0, the next header would lose to it (§2.4, the higher generation wins).
pub(crate) fn next_generation(g: u64) -> Result<u64> {
    g.checked_add(1).ok_or_else(|| {
        err(ErrorKind::Corrupt, "the header generation is at its largest value: no header can follow it")
    })
}

/// Writes `h` with the next generation into the slot not holding the current header, and
/// syncs if asked. For header-only changes by tools that hold the image's lock without
/// opening its map (snapshot); `h` must be the header last read from `storage`.
pub fn write_next_header(storage: &dyn Storage, h: &mut Header, sync: bool) -> Result<()> {
    let mut next = h.clone();
    next.generation = next_generation(h.generation)?;
    storage.write_at(&next.encode(), next.slot_offset())?;
    if sync {
        storage.sync()?;
    }
    *h = next;
    Ok(())
}

/// Reads only the current header of the image at `path`, without locks and without the map.
pub fn read_header_only(path: &Path) -> Result<Header> {
    read_header_slots(path).map(|(h, _)| h)
}

/// The current header of the image at `path`, and whether the other slot is unreadable.
pub fn read_header_slots(path: &Path) -> Result<(Header, bool)> {
    let s = FileStorage::open(path, false, LockMode::None)?;
    let len = s.len()?;
    read_header_area(&s, len).map_err(|e| e.with_file(path).during("open"))
}

fn read_header(storage: &dyn Storage, file_len: u64) -> Result<Header> {
    read_header_area(storage, file_len).map(|(h, _)| h)
}

fn read_header_area(storage: &dyn Storage, file_len: u64) -> Result<(Header, bool)> {
    let mut area = vec![0u8; HEADER_AREA as usize];
    storage.read_at(&mut area, 0)?;
    if file_len < HEADER_AREA {
        return Err(if area[..8] == crate::format::MAGIC {
            err(ErrorKind::Truncated, format!("file is {file_len} bytes, shorter than the 8192-byte header area"))
        } else {
            err(ErrorKind::NotAnImage, "not a cowdisk image (bad magic)")
        });
    }
    Header::choose(&area)
}

/// Every data block the map claims must lie inside the file: data reaches the disk before the
/// map that points at it (spec §5.3), so a block past the end means the map is wrong.
fn check_data_within_file(map: &ChunkMap, file_len: u64) -> Result<()> {
    for (chunk, e) in map.iter() {
        if e.data_offset == 0 {
            continue;
        }
        let last = (0..e.blocks.len()).rev().find(|&b| e.blocks.get(b) == BlockState::Data);
        if let Some(b) = last {
            let end = e.data_offset + (b as u64 + 1) * BLOCK_SIZE;
            if end > file_len {
                return Err(err(
                    ErrorKind::Corrupt,
                    format!("map entry for chunk {chunk} points past the end of the file ({end} > {file_len})"),
                )
                .at(e.data_offset));
            }
        }
    }
    Ok(())
}
