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
/// Requests and replies once NBD_OPT_EXTENDED_HEADERS is agreed (the spec's extension of that
/// name, which qemu 9 and later ask for first).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

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
pub const OPT_EXTENDED_HEADERS: u32 = 11;

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
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

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
/// Extended headers only: the length field counts payload bytes that follow the header.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
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
pub const EXTENDED_REQUEST_SIZE: usize = 32;
pub const SIMPLE_REPLY_SIZE: usize = 16;

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

/// A request, compact or extended. `length` is the header's length field (a compact one's 32
/// bits widened): the payload's length for a write, and in an extended request for any command
/// whose flags carry [`CMD_FLAG_PAYLOAD_LEN`]; the effect length otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Bytes of payload that follow the header on the wire. The extension asks clients to flag
    /// a write's payload with [`CMD_FLAG_PAYLOAD_LEN`]; qemu's client (9.0 to 10.0 at least)
    /// does not, and qemu-nbd reads a write's payload either way: so does this server.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let has = self.typ == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if has {
            self.length
        } else {
            0
        }
    }
}

/// The request header's size: [`REQUEST_SIZE`] or, with extended headers,
/// [`EXTENDED_REQUEST_SIZE`].
pub fn request_size(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_SIZE
    } else {
        REQUEST_SIZE
    }
}

/// Parses a request header of [`request_size`] bytes; `None` for a bad magic (the connection
/// cannot continue). A compact magic where extended headers were agreed is a bad magic too.
pub fn parse_request(b: &[u8], extended: bool) -> Option<Request> {
    let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    let b = b.get(..request_size(extended))?;
    if BE::read_u32(&b[0..]) != magic {
        return None;
    }
    Some(Request {
        flags: BE::read_u16(&b[4..]),
        typ: BE::read_u16(&b[6..]),
        cookie: BE::read_u64(&b[8..]),
        offset: BE::read_u64(&b[16..]),
        length: if extended { BE::read_u64(&b[24..]) } else { u64::from(BE::read_u32(&b[24..])) },
    })
}

/// A request header as a client sends it; a compact one keeps the low 32 bits of `length`.
pub fn encode_request(r: &Request, extended: bool) -> Vec<u8> {
    let mut b = vec![0u8; request_size(extended)];
    BE::write_u32(&mut b[0..], if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC });
    BE::write_u16(&mut b[4..], r.flags);
    BE::write_u16(&mut b[6..], r.typ);
    BE::write_u64(&mut b[8..], r.cookie);
    BE::write_u64(&mut b[16..], r.offset);
    if extended {
        BE::write_u64(&mut b[24..], r.length);
    } else {
        BE::write_u32(&mut b[24..], r.length as u32);
    }
    b
}

pub fn simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    BE::write_u32(&mut out[0..], SIMPLE_REPLY_MAGIC);
    BE::write_u32(&mut out[4..], error);
    BE::write_u64(&mut out[8..], cookie);
}

/// How reply chunks are framed: NBD_OPT_STRUCTURED_REPLY's 20-byte header, or
/// NBD_OPT_EXTENDED_HEADERS' 32-byte one, which also carries the request's offset and a
/// 64-bit length. Every chunk of one reply is framed for the request it answers
/// ([`Framing::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    extended: bool,
    cookie: u64,
    /// The request's offset: an extended header repeats it in every chunk of the reply.
    offset: u64,
}

impl Framing {
    pub fn new(extended: bool, req: &Request) -> Framing {
        Framing { extended, cookie: req.cookie, offset: req.offset }
    }

    pub fn header_size(&self) -> usize {
        if self.extended {
            32
        } else {
            20
        }
    }

    /// Bytes before the data of an OFFSET_DATA chunk: the chunk header and the 64-bit offset.
    pub fn data_header_size(&self) -> usize {
        self.header_size() + 8
    }

    /// Bytes of a complete OFFSET_HOLE chunk: the chunk header, a 64-bit offset, a 32-bit
    /// length.
    pub fn hole_chunk_size(&self) -> usize {
        self.header_size() + 12
    }

    /// Writes a chunk header for a payload of `length` bytes.
    pub fn header(&self, out: &mut [u8], flags: u16, typ: u16, length: u64) {
        let magic = if self.extended { EXTENDED_REPLY_MAGIC } else { STRUCTURED_REPLY_MAGIC };
        BE::write_u32(&mut out[0..], magic);
        BE::write_u16(&mut out[4..], flags);
        BE::write_u16(&mut out[6..], typ);
        BE::write_u64(&mut out[8..], self.cookie);
        if self.extended {
            BE::write_u64(&mut out[16..], self.offset);
            BE::write_u64(&mut out[24..], length);
        } else {
            BE::write_u32(&mut out[16..], length as u32);
        }
    }

    /// Writes the first [`Framing::data_header_size`] bytes of an OFFSET_DATA chunk carrying
    /// `len` bytes read from `offset`; the caller puts the data right after them.
    pub fn data_header(&self, out: &mut [u8], flags: u16, offset: u64, len: u32) {
        self.header(out, flags, REPLY_TYPE_OFFSET_DATA, 8 + u64::from(len));
        BE::write_u64(&mut out[self.header_size()..], offset);
    }

    /// Writes a complete OFFSET_HOLE chunk ([`Framing::hole_chunk_size`] bytes): `len` bytes at
    /// `offset` read as zeros.
    pub fn hole(&self, out: &mut [u8], flags: u16, offset: u64, len: u32) {
        self.header(out, flags, REPLY_TYPE_OFFSET_HOLE, 12);
        let h = self.header_size();
        BE::write_u64(&mut out[h..], offset);
        BE::write_u32(&mut out[h + 8..], len);
    }

    /// Appends a complete chunk to `out`.
    pub fn push(&self, out: &mut Vec<u8>, flags: u16, typ: u16, payload: &[u8]) {
        let at = out.len();
        out.resize(at + self.header_size(), 0);
        self.header(&mut out[at..], flags, typ, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    /// Appends a block status chunk for context `context`: NBD_REPLY_TYPE_BLOCK_STATUS with
    /// 32-bit (length, flags) descriptors, or with extended headers
    /// NBD_REPLY_TYPE_BLOCK_STATUS_EXT with a descriptor count and 64-bit ones. Compact
    /// descriptors lie within a request of at most 2^32 - 1 bytes, so their lengths fit.
    pub fn push_block_status(&self, out: &mut Vec<u8>, flags: u16, context: u32, descriptors: &[(u64, u32)]) {
        let mut b;
        if self.extended {
            b = vec![0u8; 8 + 16 * descriptors.len()];
            BE::write_u32(&mut b[0..], context);
            BE::write_u32(&mut b[4..], descriptors.len() as u32);
            for (i, &(len, state)) in descriptors.iter().enumerate() {
                BE::write_u64(&mut b[8 + 16 * i..], len);
                BE::write_u64(&mut b[16 + 16 * i..], u64::from(state));
            }
        } else {
            b = vec![0u8; 4 + 8 * descriptors.len()];
            BE::write_u32(&mut b[0..], context);
            for (i, &(len, state)) in descriptors.iter().enumerate() {
                BE::write_u32(&mut b[4 + 8 * i..], u32::try_from(len).unwrap_or(u32::MAX));
                BE::write_u32(&mut b[8 + 8 * i..], state);
            }
        }
        let typ = if self.extended { REPLY_TYPE_BLOCK_STATUS_EXT } else { REPLY_TYPE_BLOCK_STATUS };
        self.push(out, flags, typ, &b);
    }
}

/// `s` cut to at most `max` bytes at a character boundary: a message the spec says is UTF-8
/// must not end in half a character.
pub fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = clip(message, 1024).as_bytes();
    let mut b = vec![0u8; 6];
    BE::write_u32(&mut b[0..], error);
    BE::write_u16(&mut b[4..], msg.len() as u16);
    b.extend_from_slice(msg);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_cut_at_a_character_boundary() {
        let msg = format!("{}é tail", "x".repeat(1023));
        let b = error_payload(5, &msg);
        let len = BE::read_u16(&b[4..]) as usize;
        assert_eq!(len, 1023, "the two-byte character at 1023 does not fit whole");
        assert!(std::str::from_utf8(&b[6..]).is_ok());
        assert_eq!(clip("abc", 10), "abc");
    }

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
        let b = encode_request(&r, false);
        assert_eq!(b.len(), REQUEST_SIZE);
        assert_eq!(parse_request(&b, false), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(parse_request(&bad, false), None);
    }

    #[test]
    fn extended_request_carries_a_64_bit_length_and_its_own_magic() {
        let r = Request { flags: 0, typ: CMD_TRIM, cookie: 5, offset: 1 << 40, length: 6 << 30 };
        let b = encode_request(&r, true);
        assert_eq!(b.len(), EXTENDED_REQUEST_SIZE);
        assert_eq!(BE::read_u32(&b[0..]), 0x21e4_1c71);
        assert_eq!(BE::read_u64(&b[24..]), 6 << 30);
        assert_eq!(parse_request(&b, true), Some(r));
        // Each header's magic is refused where the other was agreed.
        assert_eq!(parse_request(&b, false), None);
        assert_eq!(parse_request(&encode_request(&r, false), true), None);
    }

    #[test]
    fn payload_follows_a_write_or_an_extended_request_flagged_payload_len() {
        let w = Request { flags: 0, typ: CMD_WRITE, cookie: 1, offset: 0, length: 512 };
        assert_eq!(w.payload_len(false), 512);
        assert_eq!(w.payload_len(true), 512, "qemu's writes do not set the flag");
        let w = Request { flags: CMD_FLAG_PAYLOAD_LEN, ..w };
        assert_eq!(w.payload_len(true), 512);
        let t = Request { flags: CMD_FLAG_PAYLOAD_LEN, typ: CMD_BLOCK_STATUS, ..w };
        assert_eq!(t.payload_len(true), 512);
        assert_eq!(Request { flags: 0, ..t }.payload_len(true), 0);
        assert_eq!(Request { flags: 0, ..t }.payload_len(false), 0);
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
        let f = Framing::new(false, &Request { flags: 0, typ: CMD_READ, cookie: 7, offset: 0, length: 1 << 20 });
        let mut out = [0xffu8; 32];
        assert_eq!(f.hole_chunk_size(), 32);
        f.hole(&mut out, REPLY_FLAG_DONE, 4096, 512);
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
        let f = Framing::new(false, &Request { flags: 0, typ: CMD_READ, cookie: 9, offset: 0, length: 1 << 20 });
        let mut out = [0xffu8; 28];
        assert_eq!(f.data_header_size(), 28);
        f.data_header(&mut out, 0, 1 << 40, 65536);
        assert_eq!(BE::read_u32(&out[0..]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(BE::read_u16(&out[4..]), 0);
        assert_eq!(BE::read_u16(&out[6..]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(BE::read_u64(&out[8..]), 9);
        assert_eq!(BE::read_u32(&out[16..]), 65536 + 8);
        assert_eq!(BE::read_u64(&out[20..]), 1 << 40);
    }

    #[test]
    fn extended_chunks_repeat_the_request_offset_and_carry_64_bit_lengths() {
        let req = Request { flags: 0, typ: CMD_READ, cookie: 9, offset: 1 << 33, length: 1 << 20 };
        let f = Framing::new(true, &req);
        let mut out = [0xffu8; 44];
        assert_eq!(f.hole_chunk_size(), 44);
        f.hole(&mut out, REPLY_FLAG_DONE, (1 << 33) + 4096, 512);
        assert_eq!(BE::read_u32(&out[0..]), 0x6e8a_278c);
        assert_eq!(BE::read_u16(&out[4..]), REPLY_FLAG_DONE);
        assert_eq!(BE::read_u16(&out[6..]), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(BE::read_u64(&out[8..]), 9);
        assert_eq!(BE::read_u64(&out[16..]), 1 << 33, "the request's offset");
        assert_eq!(BE::read_u64(&out[24..]), 12);
        assert_eq!(BE::read_u64(&out[32..]), (1 << 33) + 4096, "the hole's own offset");
        assert_eq!(BE::read_u32(&out[40..]), 512);
    }

    #[test]
    fn extended_block_status_has_a_count_and_64_bit_descriptors() {
        let req = Request { flags: 0, typ: CMD_BLOCK_STATUS, cookie: 3, offset: 0, length: 8 << 30 };
        let mut out = Vec::new();
        Framing::new(true, &req).push_block_status(&mut out, REPLY_FLAG_DONE, 1, &[(6 << 30, 3), (2 << 30, 0)]);
        assert_eq!(out.len(), 32 + 8 + 32);
        assert_eq!(BE::read_u16(&out[6..]), REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(BE::read_u64(&out[24..]), 40);
        assert_eq!(BE::read_u32(&out[32..]), 1);
        assert_eq!(BE::read_u32(&out[36..]), 2);
        assert_eq!(BE::read_u64(&out[40..]), 6 << 30);
        assert_eq!(BE::read_u64(&out[48..]), 3);
        assert_eq!(BE::read_u64(&out[56..]), 2 << 30);
        let mut compact = Vec::new();
        Framing::new(false, &req).push_block_status(&mut compact, REPLY_FLAG_DONE, 1, &[(4096, 3)]);
        assert_eq!(compact.len(), 20 + 4 + 8);
        assert_eq!(BE::read_u16(&compact[6..]), REPLY_TYPE_BLOCK_STATUS);
    }
}
