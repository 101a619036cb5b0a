//! Per-chunk block states: two bit planes (data, zero) over the 4 KiB blocks of one chunk.
//!
//! A block is Absent (0,0: ask the layer below), Data (1,0: stored in this layer's slot) or
//! Zero (0,1: reads as zeros, hides the layers below). (1,1) is invalid on disk. Chunks of up
//! to 64 blocks keep both planes inline, so a map entry of the default 64 KiB chunk costs no
//! heap allocation for its bitmaps.

use bitvec::prelude::*;
use byteorder::ByteOrder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Absent,
    Data,
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Planes {
    /// data plane in word 0, zero plane in word 1.
    Inline([u64; 2]),
    /// data plane in words[..n], zero plane in words[n..].
    Heap(Box<[u64]>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStates {
    planes: Planes,
    blocks: usize,
}

impl BlockStates {
    /// All `blocks` blocks absent. `blocks` is a power of two from 1 to 512.
    pub fn new(blocks: usize) -> BlockStates {
        debug_assert!(blocks.is_power_of_two() && blocks <= 512);
        let planes = if blocks <= 64 {
            Planes::Inline([0; 2])
        } else {
            Planes::Heap(vec![0u64; 2 * blocks / 64].into_boxed_slice())
        };
        BlockStates { planes, blocks }
    }

    pub fn len(&self) -> usize {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    fn data(&self) -> &BitSlice<u64, Lsb0> {
        match &self.planes {
            Planes::Inline(w) => &w[0..1].view_bits::<Lsb0>()[..self.blocks],
            Planes::Heap(w) => &w[..w.len() / 2].view_bits::<Lsb0>()[..self.blocks],
        }
    }

    fn zero(&self) -> &BitSlice<u64, Lsb0> {
        match &self.planes {
            Planes::Inline(w) => &w[1..2].view_bits::<Lsb0>()[..self.blocks],
            Planes::Heap(w) => &w[w.len() / 2..].view_bits::<Lsb0>()[..self.blocks],
        }
    }

    fn planes_mut(&mut self) -> (&mut BitSlice<u64, Lsb0>, &mut BitSlice<u64, Lsb0>) {
        let n = self.blocks;
        match &mut self.planes {
            Planes::Inline(w) => {
                let (d, z) = w.split_at_mut(1);
                (&mut d.view_bits_mut::<Lsb0>()[..n], &mut z.view_bits_mut::<Lsb0>()[..n])
            }
            Planes::Heap(w) => {
                let half = w.len() / 2;
                let (d, z) = w.split_at_mut(half);
                (&mut d.view_bits_mut::<Lsb0>()[..n], &mut z.view_bits_mut::<Lsb0>()[..n])
            }
        }
    }

    pub fn get(&self, block: usize) -> BlockState {
        match (self.data()[block], self.zero()[block]) {
            (true, _) => BlockState::Data,
            (false, true) => BlockState::Zero,
            (false, false) => BlockState::Absent,
        }
    }

    /// Sets blocks `start..end` to `state`.
    pub fn set_range(&mut self, start: usize, end: usize, state: BlockState) {
        let (d, z) = self.planes_mut();
        d[start..end].fill(state == BlockState::Data);
        z[start..end].fill(state == BlockState::Zero);
    }

    /// The end of the run of blocks sharing block `start`'s state, bounded by `end`.
    pub fn run_end(&self, start: usize, end: usize) -> usize {
        let (d, z) = (&self.data()[start..end], &self.zero()[start..end]);
        let len = match self.get(start) {
            BlockState::Data => d.first_zero(),
            BlockState::Zero => z.first_zero(),
            BlockState::Absent => match (d.first_one(), z.first_one()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        };
        start + len.unwrap_or(end - start)
    }

    /// Runs of equal state over `start..end`: (run start, run end, state).
    pub fn runs(&self, start: usize, end: usize) -> impl Iterator<Item = (usize, usize, BlockState)> + '_ {
        let mut pos = start;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let e = self.run_end(pos, end);
            let r = (pos, e, self.get(pos));
            pos = e;
            Some(r)
        })
    }

    pub fn count(&self, state: BlockState) -> usize {
        match state {
            BlockState::Data => self.data().count_ones(),
            BlockState::Zero => self.zero().count_ones(),
            BlockState::Absent => self.blocks - self.data().count_ones() - self.zero().count_ones(),
        }
    }

    /// The data plane as a bit mask, block `i` at bit `i`: only for chunks of at most 64 blocks
    /// (every chunk of an image with data checksums), `None` for larger ones.
    pub fn data_mask(&self) -> Option<u64> {
        match &self.planes {
            Planes::Inline(w) => Some(w[0]),
            Planes::Heap(_) => None,
        }
    }

    pub fn all(&self, state: BlockState, end: usize) -> bool {
        self.run_end(0, end) == end && self.get(0) == state
    }

    /// Writes both planes as on disk: each plane `plane_bytes` long, block i at byte i/8 bit i%8.
    pub fn encode(&self, plane_bytes: usize, out: &mut [u8]) {
        // Word by word: the planes are Lsb0 words whose bits past `blocks` are zero, so a word's
        // little-endian bytes are the plane's bytes as stored.
        let (data, zero): (&[u64], &[u64]) = match &self.planes {
            Planes::Inline(w) => (&w[0..1], &w[1..2]),
            Planes::Heap(w) => w.split_at(w.len() / 2),
        };
        let (d_out, z_out) = out[..2 * plane_bytes].split_at_mut(plane_bytes);
        for (words, out) in [(data, d_out), (zero, z_out)] {
            for (i, bytes) in out.chunks_mut(8).enumerate() {
                let w = words.get(i).copied().unwrap_or(0);
                debug_assert!(bytes.len() == 8 || w >> (8 * bytes.len()) == 0, "bits past the plane");
                bytes.copy_from_slice(&w.to_le_bytes()[..bytes.len()]);
            }
        }
    }

    /// Reads both planes; `None` if a bit is set beyond `valid_blocks` or a block is both data and zero.
    ///
    /// Word by word, the mirror of [`BlockStates::encode`]: opening a deep chain decodes every
    /// entry of every layer, and a bit-by-bit copy was a tenth of that.
    pub fn decode(blocks: usize, valid_blocks: usize, plane_bytes: usize, bytes: &[u8]) -> Option<BlockStates> {
        let mut s = BlockStates::new(blocks);
        let (dp, zp) = (&bytes[..plane_bytes], &bytes[plane_bytes..2 * plane_bytes]);
        let words: &mut [u64] = match &mut s.planes {
            Planes::Inline(w) => w,
            Planes::Heap(w) => w,
        };
        // A plane never holds more bits than its words: every stored bit is read and checked.
        let n = words.len() / 2;
        debug_assert!(plane_bytes * 8 <= n * 64, "a {plane_bytes}-byte plane for {blocks} blocks");
        for i in 0..n {
            let (d, z) = (plane_word(dp, i), plane_word(zp, i));
            let lo = 64 * i;
            let valid = match valid_blocks.saturating_sub(lo) {
                0 => 0,
                v if v >= 64 => u64::MAX,
                v => (1u64 << v) - 1,
            };
            if (d | z) & !valid != 0 || d & z != 0 {
                return None;
            }
            words[i] = d;
            words[n + i] = z;
        }
        Some(s)
    }
}

/// Word `i` of a plane as stored (little-endian bytes; a plane shorter than the word is padded
/// with zeros).
fn plane_word(plane: &[u8], i: usize) -> u64 {
    let start = (8 * i).min(plane.len());
    let end = (start + 8).min(plane.len());
    if start == end {
        return 0;
    }
    byteorder::LittleEndian::read_uint(&plane[start..end], end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk size (1 to 512 blocks): the planes as stored have block i at byte i/8, bit
    /// i%8 (the data plane, then the zero plane), and decode back to the same states.
    #[test]
    fn planes_encode_bit_by_bit_and_decode_back_at_every_chunk_size() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for shift in 0..=9 {
            let blocks = 1usize << shift;
            let plane = (blocks / 8).max(4);
            let mut s = BlockStates::new(blocks);
            for b in 0..blocks {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let st = [BlockState::Absent, BlockState::Data, BlockState::Zero][(x % 3) as usize];
                s.set_range(b, b + 1, st);
            }
            let mut out = vec![0xffu8; 2 * plane];
            s.encode(plane, &mut out);
            for b in 0..8 * plane {
                let bit = |p: usize| out[p * plane + b / 8] >> (b % 8) & 1 == 1;
                let want = if b < blocks { s.get(b) } else { BlockState::Absent };
                assert_eq!(bit(0), want == BlockState::Data, "{blocks} blocks, data bit {b}");
                assert_eq!(bit(1), want == BlockState::Zero, "{blocks} blocks, zero bit {b}");
            }
            assert_eq!(BlockStates::decode(blocks, blocks, plane, &out), Some(s));
        }
    }

    #[test]
    fn new_chunk_is_all_absent() {
        let s = BlockStates::new(16);
        assert!(s.all(BlockState::Absent, 16));
        assert_eq!(s.count(BlockState::Absent), 16);
    }

    #[test]
    fn runs_split_where_state_changes() {
        let mut s = BlockStates::new(16);
        s.set_range(2, 5, BlockState::Data);
        s.set_range(5, 7, BlockState::Zero);
        let runs: Vec<_> = s.runs(0, 16).collect();
        assert_eq!(
            runs,
            vec![
                (0, 2, BlockState::Absent),
                (2, 5, BlockState::Data),
                (5, 7, BlockState::Zero),
                (7, 16, BlockState::Absent)
            ]
        );
    }

    #[test]
    fn large_chunks_use_heap_planes_and_behave_the_same() {
        let mut s = BlockStates::new(512);
        s.set_range(100, 300, BlockState::Data);
        s.set_range(299, 301, BlockState::Zero);
        assert_eq!(s.get(298), BlockState::Data);
        assert_eq!(s.get(299), BlockState::Zero);
        assert_eq!(s.get(301), BlockState::Absent);
        assert_eq!(s.count(BlockState::Data), 199);
    }

    #[test]
    fn encode_places_block_i_at_byte_i_div_8_bit_i_mod_8() {
        let mut s = BlockStates::new(16);
        s.set_range(0, 1, BlockState::Data);
        s.set_range(9, 10, BlockState::Data);
        s.set_range(15, 16, BlockState::Zero);
        let mut out = [0u8; 8];
        s.encode(4, &mut out);
        assert_eq!(out, [0x01, 0x02, 0, 0, 0, 0x80, 0, 0]);
        assert_eq!(BlockStates::decode(16, 16, 4, &out), Some(s));
    }

    #[test]
    fn rejects_block_both_data_and_zero() {
        let out = [0x01, 0, 0, 0, 0x01, 0, 0, 0];
        assert_eq!(BlockStates::decode(16, 16, 4, &out), None);
    }

    #[test]
    fn rejects_bits_beyond_the_valid_blocks() {
        let out = [0x00, 0x01, 0, 0, 0, 0, 0, 0];
        assert_eq!(BlockStates::decode(16, 8, 4, &out), None);
        assert!(BlockStates::decode(16, 9, 4, &out).is_some());
    }

    /// At every chunk size, heap planes included, and at every bit of either plane: one set bit
    /// decodes only below the valid blocks, and a block set in both planes never does.
    #[test]
    fn every_bit_of_both_planes_is_checked_at_every_chunk_size() {
        for shift in 0..=9 {
            let blocks = 1usize << shift;
            let plane = (blocks / 8).max(4);
            for bit in 0..plane * 8 {
                for (p, valid) in [0, 1]
                    .into_iter()
                    .flat_map(|p| [blocks, blocks - blocks / 3, blocks.saturating_sub(3).max(1)].map(|v| (p, v)))
                {
                    let mut out = vec![0u8; 2 * plane];
                    out[p * plane + bit / 8] |= 1 << (bit % 8);
                    let got = BlockStates::decode(blocks, valid, plane, &out);
                    assert_eq!(got.is_some(), bit < valid, "{blocks} blocks, {valid} valid, plane {p}, bit {bit}");
                    if let Some(s) = got {
                        let want = if p == 0 { BlockState::Data } else { BlockState::Zero };
                        assert_eq!(s.get(bit), want);
                        assert_eq!(s.count(BlockState::Absent), blocks - 1);
                    }
                }
                let mut both = vec![0u8; 2 * plane];
                both[bit / 8] |= 1 << (bit % 8);
                both[plane + bit / 8] |= 1 << (bit % 8);
                assert_eq!(BlockStates::decode(blocks, blocks, plane, &both), None, "{blocks} blocks, bit {bit}");
            }
        }
    }
}
