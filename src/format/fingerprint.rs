//! The fingerprint that identifies a raw parent: CRC-32 over its size and 16 sampled 4 KiB
//! pieces (spec §3.2). It catches a swapped or rewritten base at the cost of 64 KiB of reads.

use crate::error::Result;
use crate::storage::Storage;
use byteorder::{ByteOrder, LittleEndian as LE};

pub const SAMPLES: u64 = 16;
pub const SAMPLE_SIZE: u64 = 4096;
/// Files up to this size are hashed whole.
pub const WHOLE_FILE_LIMIT: u64 = SAMPLES * SAMPLE_SIZE;

/// Offsets of the sampled pieces of a file of `size` bytes (empty when hashed whole).
pub fn sample_offsets(size: u64) -> Vec<u64> {
    if size <= WHOLE_FILE_LIMIT {
        return Vec::new();
    }
    let span = size - SAMPLE_SIZE;
    (0..SAMPLES).map(|i| (u128::from(span) * u128::from(i) / u128::from(SAMPLES - 1)) as u64).collect()
}

pub fn raw_fingerprint(s: &dyn Storage, size: u64) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut sz = [0u8; 8];
    LE::write_u64(&mut sz, size);
    h.update(&sz);
    if size <= WHOLE_FILE_LIMIT {
        let mut buf = vec![0u8; size as usize];
        s.read_at(&mut buf, 0)?;
        h.update(&buf);
    } else {
        let mut buf = vec![0u8; SAMPLE_SIZE as usize];
        for off in sample_offsets(size) {
            s.read_at(&mut buf, off)?;
            h.update(&buf);
        }
    }
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn samples_start_at_zero_and_end_at_the_last_block() {
        let o = sample_offsets(1 << 20);
        assert_eq!(o.len(), 16);
        assert_eq!(o[0], 0);
        assert_eq!(o[15], (1 << 20) - 4096);
    }

    #[test]
    fn small_file_is_hashed_whole() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut h = crc32fast::Hasher::new();
        h.update(&3u64.to_le_bytes());
        h.update(&[1, 2, 3]);
        assert_eq!(raw_fingerprint(&s, 3).unwrap(), h.finalize());
    }

    #[test]
    fn a_change_inside_a_sample_changes_the_fingerprint() {
        let size = 1u64 << 20;
        let s = MemStorage::from_bytes(vec![5u8; size as usize]);
        let before = raw_fingerprint(&s, size).unwrap();
        s.write_at(&[6], sample_offsets(size)[7] + 100).unwrap();
        assert_ne!(raw_fingerprint(&s, size).unwrap(), before);
    }
}
