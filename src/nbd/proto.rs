//! The NBD wire protocol, pure: constants, request parsing and reply encoding, no I/O.
//! Names and values follow the NetworkBlockDevice protocol specification (doc/proto.md);
//! every integer on the wire is big-endian.

use byteorder::{BigEndian as BE, ByteOrder};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The metadata context the NBD spec defines (qemu's are in `meta.rs`).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Strings (export names, queries) are at most 4096 bytes (spec: Conventions).
pub const MAX_STRING: usize = 4096;

pub const REQUEST_SIZE: usize = 28;
pub const SIMPLE_REPLY_SIZE: usize = 16;
pub const CHUNK_HEADER_SIZE: usize = 20;

/// Client flags this server understands; any other bit ends the connection.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// The 18-byte greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    BE::write_u64(&mut b[0..], NBDMAGIC);
    BE::write_u64(&mut b[8..], IHAVEOPT);
    BE::write_u16(&mut b[16..], FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    b
}

/// Option request header: (magic, option, length).
pub fn parse_option_header(b: &[u8; 16]) -> (u64, u32, u32) {
    (BE::read_u64(&b[0..]), BE::read_u32(&b[8..]), BE::read_u32(&b[12..]))
}

/// An option reply: header and payload in one buffer.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + data.len()];
    BE::write_u64(&mut b[0..], OPT_REPLY_MAGIC);
    BE::write_u32(&mut b[8..], option);
    BE::write_u32(&mut b[12..], reply);
    BE::write_u32(&mut b[16..], data.len() as u32);
    b[20..].copy_from_slice(data);
    b
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = vec![0u8; 12];
    BE::write_u16(&mut b[0..], INFO_EXPORT);
    BE::write_u64(&mut b[2..], size);
    BE::write_u16(&mut b[10..], flags);
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = vec![0u8; 14];
    BE::write_u16(&mut b[0..], INFO_BLOCK_SIZE);
    BE::write_u32(&mut b[2..], min);
    BE::write_u32(&mut b[6..], preferred);
    BE::write_u32(&mut b[10..], max);
    b
}

pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = vec![0u8; 2];
    BE::write_u16(&mut b[0..], kind);
    b.extend_from_slice(s.as_bytes());
    b
}

/// NBD_REP_SERVER payload: name length, name, description.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    BE::write_u32(&mut b[0..], name.len() as u32);
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    BE::write_u32(&mut b[0..], id);
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeros unless NO_ZEROES was agreed.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
    BE::write_u64(&mut b[0..], size);
    BE::write_u16(&mut b[8..], flags);
    b
}

/// A cursor over an option payload that refuses to read past its end.
pub struct Payload<'a> {
    b: &'a [u8],
}

impl<'a> Payload<'a> {
    pub fn new(b: &'a [u8]) -> Payload<'a> {
        Payload { b }
    }

    pub fn u16(&mut self) -> Option<u16> {
        let v = BE::read_u16(self.b.get(..2)?);
        self.b = &self.b[2..];
        Some(v)
    }

    pub fn u32(&mut self) -> Option<u32> {
        let v = BE::read_u32(self.b.get(..4)?);
        self.b = &self.b[4..];
        Some(v)
    }

    /// A string of `len` bytes: at most [`MAX_STRING`], valid UTF-8, no NUL.
    pub fn string(&mut self, len: usize) -> Option<&'a str> {
        if len > MAX_STRING {
            return None;
        }
        let s = self.b.get(..len)?;
        self.b = &self.b[len..];
        std::str::from_utf8(s).ok().filter(|s| !s.contains('\0'))
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO payload: export name and requested info types.
pub fn parse_info_request(b: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut p = Payload::new(b);
    let len = p.u32()? as usize;
    let name = p.string(len)?;
    let n = p.u16()?;
    let mut reqs = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        reqs.push(p.u16()?);
    }
    p.is_empty().then_some((name, reqs))
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT payload: export name and queries.
pub fn parse_meta_request(b: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut p = Payload::new(b);
    let len = p.u32()? as usize;
    let name = p.string(len)?;
    let n = p.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let l = p.u32()? as usize;
        queries.push(p.string(l)?);
    }
    p.is_empty().then_some((name, queries))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a request header; `None` for a bad magic (the connection cannot continue).
pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Option<Request> {
    if BE::read_u32(&b[0..]) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: BE::read_u16(&b[4..]),
        typ: BE::read_u16(&b[6..]),
        cookie: BE::read_u64(&b[8..]),
        offset: BE::read_u64(&b[16..]),
        length: BE::read_u32(&b[24..]),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    BE::write_u32(&mut b[0..], REQUEST_MAGIC);
    BE::write_u16(&mut b[4..], r.flags);
    BE::write_u16(&mut b[6..], r.typ);
    BE::write_u64(&mut b[8..], r.cookie);
    BE::write_u64(&mut b[16..], r.offset);
    BE::write_u32(&mut b[24..], r.length);
    b
}

pub fn simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    BE::write_u32(&mut out[0..], SIMPLE_REPLY_MAGIC);
    BE::write_u32(&mut out[4..], error);
    BE::write_u64(&mut out[8..], cookie);
}

/// Writes a structured chunk header for a payload of `length` bytes.
pub fn chunk_header(out: &mut [u8], flags: u16, typ: u16, cookie: u64, length: u32) {
    BE::write_u32(&mut out[0..], STRUCTURED_REPLY_MAGIC);
    BE::write_u16(&mut out[4..], flags);
    BE::write_u16(&mut out[6..], typ);
    BE::write_u64(&mut out[8..], cookie);
    BE::write_u32(&mut out[16..], length);
}

/// Bytes before the data of an OFFSET_DATA chunk: the chunk header and the 64-bit offset.
pub const DATA_CHUNK_HEADER_SIZE: usize = CHUNK_HEADER_SIZE + 8;
/// Bytes of a complete OFFSET_HOLE chunk: the chunk header, a 64-bit offset, a 32-bit length.
pub const HOLE_CHUNK_SIZE: usize = CHUNK_HEADER_SIZE + 12;

/// Writes the first [`DATA_CHUNK_HEADER_SIZE`] bytes of an OFFSET_DATA chunk carrying `len`
/// bytes read from `offset`; the caller puts the data right after them.
pub fn data_chunk_header(out: &mut [u8], flags: u16, cookie: u64, offset: u64, len: u32) {
    chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
    BE::write_u64(&mut out[CHUNK_HEADER_SIZE..], offset);
}

/// Writes a complete OFFSET_HOLE chunk ([`HOLE_CHUNK_SIZE`] bytes): `len` bytes at `offset`
/// read as zeros.
pub fn hole_chunk(out: &mut [u8], flags: u16, cookie: u64, offset: u64, len: u32) {
    chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    BE::write_u64(&mut out[CHUNK_HEADER_SIZE..], offset);
    BE::write_u32(&mut out[CHUNK_HEADER_SIZE + 8..], len);
}

/// Appends a complete structured chunk to `out`.
pub fn push_chunk(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, payload: &[u8]) {
    let at = out.len();
    out.resize(at + CHUNK_HEADER_SIZE, 0);
    chunk_header(&mut out[at..], flags, typ, cookie, payload.len() as u32);
    out.extend_from_slice(payload);
}

pub fn error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut b = vec![0u8; 6];
    BE::write_u32(&mut b[0..], error);
    BE::write_u16(&mut b[4..], msg.len() as u16);
    b.extend_from_slice(msg);
    b
}

/// Block status payload: context id, then (length, flags) descriptors.
pub fn block_status_payload(context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut b = vec![0u8; 4 + 8 * descriptors.len()];
    BE::write_u32(&mut b[0..], context);
    for (i, (len, flags)) in descriptors.iter().enumerate() {
        BE::write_u32(&mut b[4 + 8 * i..], *len);
        BE::write_u32(&mut b[8 + 8 * i..], *flags);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn request_roundtrips_and_bad_magic_is_refused() {
        let r =
            Request { flags: CMD_FLAG_FUA, typ: CMD_WRITE, cookie: 0xdead_beef_0102, offset: 1 << 40, length: 4096 };
        let b = encode_request(&r);
        assert_eq!(parse_request(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(parse_request(&bad), None);
    }

    #[test]
    fn info_request_parses_name_and_requests_and_rejects_trailing_bytes() {
        let mut b = vec![0, 0, 0, 3];
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        assert_eq!(parse_info_request(&b), Some(("abc", vec![INFO_BLOCK_SIZE, INFO_NAME])));
        b.push(0);
        assert_eq!(parse_info_request(&b), None);
    }

    #[test]
    fn info_request_with_name_length_past_the_payload_is_refused() {
        let b = vec![0xff, 0xff, 0xff, 0xff, b'a'];
        assert_eq!(parse_info_request(&b), None);
    }

    #[test]
    fn meta_request_parses_queries() {
        let mut b = vec![0, 0, 0, 0, 0, 0, 0, 2];
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        assert_eq!(parse_meta_request(&b), Some(("", vec!["base:allocation", "qemu:dirty-bitmap:x"])));
    }

    #[test]
    fn string_with_nul_or_over_4096_bytes_is_refused() {
        assert_eq!(Payload::new(b"a\0b").string(3), None);
        let long = vec![b'a'; 4097];
        assert_eq!(Payload::new(&long).string(4097), None);
    }

    #[test]
    fn export_name_reply_has_124_zero_bytes_unless_no_zeroes() {
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
    }

    #[test]
    fn hole_chunk_layout_matches_spec() {
        let mut out = [0xffu8; HOLE_CHUNK_SIZE];
        hole_chunk(&mut out, REPLY_FLAG_DONE, 7, 4096, 512);
        assert_eq!(out.len(), 32);
        assert_eq!(BE::read_u32(&out[0..]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(BE::read_u16(&out[4..]), 1);
        assert_eq!(BE::read_u16(&out[6..]), 2);
        assert_eq!(BE::read_u64(&out[8..]), 7);
        assert_eq!(BE::read_u32(&out[16..]), 12);
        assert_eq!(BE::read_u64(&out[20..]), 4096);
        assert_eq!(BE::read_u32(&out[28..]), 512);
    }

    #[test]
    fn data_chunk_header_counts_the_offset_in_the_chunk_length() {
        let mut out = [0xffu8; DATA_CHUNK_HEADER_SIZE];
        data_chunk_header(&mut out, 0, 9, 1 << 40, 65536);
        assert_eq!(BE::read_u32(&out[0..]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(BE::read_u16(&out[4..]), 0);
        assert_eq!(BE::read_u16(&out[6..]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(BE::read_u64(&out[8..]), 9);
        assert_eq!(BE::read_u32(&out[16..]), 65536 + 8);
        assert_eq!(BE::read_u64(&out[20..]), 1 << 40);
    }
}
