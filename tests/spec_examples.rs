//! The worked examples of format-spec.md, read out of the document itself and checked against
//! the library: the header slot of §2.1 byte for byte (and its CRC), the map sector of §4.4,
//! the fingerprint sample offsets and test vectors of §3.2. If the document or the encoder
//! changes without the other, this fails.

use cowdisk::format::blocks::{BlockState, BlockStates};
use cowdisk::format::fingerprint::{raw_fingerprint, sample_offsets};
use cowdisk::format::header::{Header, MapExtent, ParentFormat, ParentRef};
use cowdisk::format::map::{encode_sector, MapEntry};
use cowdisk::format::{Geometry, FLAG_DIRTY};
use cowdisk::storage::MemStorage;

const SPEC: &str = include_str!("../format-spec.md");

/// The bytes of the hex dump in the first code block after the line starting with `marker`
/// (lines `OFFSET: 16 bytes   comment`), `len` bytes long; bytes the dump does not show are zero.
fn dump_after(marker: &str, len: usize) -> Vec<u8> {
    let at = SPEC.find(marker).unwrap_or_else(|| panic!("format-spec.md has no {marker:?}"));
    let rest = &SPEC[at..];
    let open = rest.find("```\n").expect("a code block follows") + 4;
    let close = open + rest[open..].find("```").expect("the code block ends");
    let mut out = vec![0u8; len];
    for line in rest[open..close].lines() {
        let Some((off, bytes)) = line.split_once(':') else { continue };
        let off = usize::from_str_radix(off.trim(), 16).expect("hex offset");
        let hex: Vec<u8> = bytes
            .split_whitespace()
            .take(16)
            .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad byte {b:?} in {line:?}")))
            .collect();
        assert_eq!(hex.len(), 16, "a dump line holds 16 bytes: {line:?}");
        out[off..off + 16].copy_from_slice(&hex);
    }
    out
}

/// The hex number that follows `label` in the document (e.g. `header_crc = 0x65a24861`).
fn number_after(label: &str) -> u32 {
    number_in("", label)
}

/// The hex number that follows the first `label` after `section` in the document.
fn number_in(section: &str, label: &str) -> u32 {
    let from = SPEC.find(section).unwrap_or_else(|| panic!("format-spec.md has no {section:?}"));
    let at = from + SPEC[from..].find(label).unwrap_or_else(|| panic!("format-spec.md has no {label:?}")) + label.len();
    let hex: String =
        SPEC[at..].trim_start().trim_start_matches("0x").chars().take_while(char::is_ascii_hexdigit).collect();
    u32::from_str_radix(&hex, 16).expect("a hex number")
}

#[test]
fn the_header_example_of_section_2_1_is_what_the_encoder_writes() {
    let g = Geometry::new(1 << 30, 16).unwrap();
    let mut uuid = [0u8; 16];
    for (i, b) in uuid.iter_mut().enumerate() {
        *b = 0x10 + i as u8;
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let mut parent_uuid = [0xaa; 16];
    parent_uuid[6] = (parent_uuid[6] & 0x0f) | 0x40;
    parent_uuid[8] = (parent_uuid[8] & 0x3f) | 0x80;
    let parent = ParentRef {
        format: ParentFormat::Cowdisk,
        path: b"base.cow".to_vec(),
        uuid: parent_uuid,
        size: 1 << 30,
        fingerprint: 0,
    };
    let mut h = Header::new(g, uuid, Some(parent));
    h.generation = 4;
    h.set_flag(FLAG_DIRTY, true);
    h.map_extents.push(MapExtent { offset: 131072, len: 65536 });
    let encoded = h.encode();
    let spec = dump_after("**Example.** Header slot 0", 4096);
    assert_eq!(&encoded[..], &spec[..], "the encoder and §2.1's example differ");
    assert_eq!(crc32fast::hash(&encoded[..4092]), number_after("header_crc ="));
    assert_eq!(Header::decode_slot(&spec, 0).unwrap(), h);
}

#[test]
fn the_map_sector_example_of_section_4_4_is_what_the_encoder_writes() {
    let g = Geometry::new(1 << 30, 16).unwrap();
    let mut blocks = BlockStates::new(16);
    blocks.set_range(0, 4, BlockState::Data);
    blocks.set_range(4, 6, BlockState::Zero);
    let e = MapEntry { chunk: 7, data_offset: 65536, blocks, crcs: Vec::new() };
    let mut slots: Vec<Option<&MapEntry>> = vec![None; g.entries_per_sector()];
    slots[0] = Some(&e);
    let sector = encode_sector(&g, 131072, &slots);
    let spec = dump_after("**Example.** The sector at file offset 131072", 512);
    assert_eq!(&sector[..], &spec[..], "the encoder and §4.4's example differ");
    assert_eq!(crc32fast::hash(&sector[4..]), number_in("**Example.** The sector at file offset 131072", "crc "));
    // The same bit planes as §4.1's example of a 16-block chunk.
    assert_eq!(&sector[40..48], &[0x0f, 0, 0, 0, 0x30, 0, 0, 0]);
}

#[test]
fn the_fingerprint_examples_and_vectors_of_section_3_2_hold() {
    let offsets = |size: u64| sample_offsets(size);
    let mib = offsets(1 << 20);
    assert_eq!(mib.len(), 16);
    assert!(mib.iter().enumerate().all(|(i, &o)| o == 69632 * i as u64));
    let odd = offsets(65537);
    assert_eq!((odd[0], odd[1], odd[2], odd[14], odd[15]), (0, 4096, 8192, 57344, 61441));
    let gib = offsets(1 << 30);
    assert_eq!((gib[0], gib[1], gib[2], gib[14], gib[15]), (0, 71582515, 143165030, 1002155212, 1073737728));
    assert!(offsets(65536).is_empty(), "64 KiB and less are hashed whole");

    let modulo = |n: usize| (0..n).map(|k| (k % 251) as u8).collect::<Vec<u8>>();
    let vectors: [(&str, Vec<u8>); 5] = [
        ("| the 3 bytes `01 02 03` | 3 |", vec![1, 2, 3]),
        ("| byte at offset `k` is `k mod 251` | 65536 |", modulo(65536)),
        ("| byte at offset `k` is `k mod 251` | 65537 |", modulo(65537)),
        ("| byte at offset `k` is `k mod 251` | 1048576 |", modulo(1 << 20)),
        ("| 1048576 bytes of 0x05 | 1048576 |", vec![5; 1 << 20]),
    ];
    for (row, content) in vectors {
        let want = number_after(row);
        let got = raw_fingerprint(&MemStorage::from_bytes(content.clone()), content.len() as u64).unwrap();
        assert_eq!(got, want, "fingerprint of {row}: {got:#010x}, the spec says {want:#010x}");
    }
}

#[test]
fn the_crc_check_value_of_section_3_2_holds() {
    assert_eq!(crc32fast::hash(b"123456789"), number_after("check value, CRC of ASCII `123456789` |"));
}
