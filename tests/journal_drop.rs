//! A freeze cut short by a power cut between the punch of the journal area's first sector and
//! the punch of the rest (format-spec §5.9 "Dropping the area", §5.1: an unsynced punch may
//! land in part). Found by a review (2026-12-05): the area's punch was one unsynced punch, so
//! a crash could leave the first sector gone and the records after it in place; the live
//! image then read an empty chain, numbered its next record 1 at the area's start, and a stale
//! record whose place and number followed its new chain's end joined the chain: the next open
//! replayed a block written before the freeze over what was written after it.

use cowdisk::format::{Geometry, FLAG_FROZEN};
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::recording::{CrashImages, Journal, RecOp, RecordingStorage};
use cowdisk::storage::MemStorage;
use cowdisk::{Chain, DiskFlush, DiskRead, DiskWrite, DiskZero};
use std::path::Path;
use std::sync::Arc;

const CHUNK: u64 = 64 * 1024;
const BLOCK: usize = 4096;

/// The place and length of the first durable write (a journal record) logged from `from` on.
fn record_written_after(journal: &Journal, from: usize) -> (u64, u64) {
    journal.ops()[from..]
        .iter()
        .find_map(|(_, op)| match op {
            RecOp::DurableWrite { offset, data } => Some((*offset, data.len() as u64)),
            _ => None,
        })
        .expect("a journaled flush writes a record")
}

fn block(chain: &Chain, at: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    chain.read_at(&mut b, at).unwrap();
    b
}

#[test]
fn a_freeze_cut_short_leaves_no_stale_record_to_join_a_new_chain() {
    let journal = Journal::new();
    let store = Arc::new(RecordingStorage::new(journal.clone(), 0));
    let g = Geometry::new(64 << 20, 16).unwrap();
    let img = Image::create_on(store, Path::new("top"), g, None, [7; 16]).unwrap();
    let chain = Chain::assemble(img, Vec::new(), None);
    // Every chunk the test touches gets its slot and map sector now, so that the flushes
    // below are journaled (one that adds a map extent is not, §5.9).
    for c in [0u64, 700, 800, 1000] {
        chain.write_at(&[0x11; BLOCK], c * CHUNK).unwrap();
    }
    chain.flush().unwrap();
    chain.flush().unwrap();
    // Record 2 (at the area's second sector): a map sector and a block (a block added to chunk
    // 1000), 5120 bytes.
    chain.write_at(&[0x12; BLOCK], 1000 * CHUNK + BLOCK as u64).unwrap();
    chain.flush().unwrap();
    // Record 3 (at 5632): chunk 0's block rewritten in place with 0xAA.
    let before_r3 = journal.len();
    chain.write_at(&[0xAA; BLOCK], 0).unwrap();
    chain.flush().unwrap();
    let (r3_at, _) = record_written_after(&journal, before_r3);
    // Then 0xBB, made durable by the freeze's checkpoint (no record), and the freeze.
    chain.write_at(&[0xBB; BLOCK], 0).unwrap();
    let area = chain.top().header().journal.expect("a writable image has a journal");
    chain.top().update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
    drop(chain);

    // The crash: just before the sync that follows the punch of the area's first sector, with
    // that sector punched and every other unsynced sector as last synced.
    let ops = journal.ops();
    let punch = ops
        .iter()
        .rposition(|(_, op)| matches!(op, RecOp::Punch { offset, .. } if *offset == area.offset))
        .expect("the freeze punches the area");
    let k = punch + ops[punch..].iter().position(|(_, op)| matches!(op, RecOp::Sync)).expect("a sync after it");
    let mut calls = 0;
    let bytes = CrashImages::new(&journal, 1).state(0, k, |n| {
        calls += 1;
        // Candidates come sector by sector in order: the area's first sector is the first.
        if calls == 1 {
            n - 1
        } else {
            0
        }
    });
    let a = area.offset as usize;
    assert_eq!(&bytes[a..a + 512], &[0u8; 512][..], "the crash state has the area's first sector punched");

    // The image is still live (the freezing header was not written). A writer reads an empty
    // chain and writes two journaled flushes whose records end where record 3 lies: record 1
    // a map sector (a chunk zeroed), 1024 bytes; record 2 a block rewritten in place, 4608.
    let again = Journal::new();
    let store = Arc::new(RecordingStorage::with_contents(again.clone(), 0, bytes));
    let img = Image::open_on(store.clone(), Path::new("top"), OpenOptions::writable()).expect("the crash state opens");
    assert!(!img.header().has_flag(FLAG_FROZEN), "the freezing header is not in the crash state");
    let chain = Chain::assemble(img, Vec::new(), None);
    chain.write_zeroes(700 * CHUNK, CHUNK, false).unwrap();
    chain.flush().unwrap();
    let before = again.len();
    chain.write_at(&[0x22; BLOCK], 800 * CHUNK).unwrap();
    chain.flush().unwrap();
    let (at, len) = record_written_after(&again, before);
    assert_eq!(at + len, r3_at, "the scenario needs the new chain to end where the stale record 3 lies");

    // A power cut now; what the user reads after it.
    let crash = CrashImages::new(&again, 1);
    let bytes = crash.state(0, again.len(), |n| n - 1);
    drop(chain);
    let top = Image::open_on(Arc::new(MemStorage::from_bytes(bytes)), Path::new("top"), OpenOptions::read_only())
        .expect("opens after the second crash");
    let chain = Chain::assemble(top, Vec::new(), None);
    for (at, want, what) in [
        (0, 0xBB, "chunk 0 (0xAA: a block written before the freeze)"),
        (700 * CHUNK, 0, "chunk 700, zeroed"),
        (800 * CHUNK, 0x22, "chunk 800, rewritten"),
    ] {
        let got = block(&chain, at);
        assert!(got == vec![want; BLOCK], "{what} reads {:#04x}.., not {want:#04x}", got[0]);
    }
}
