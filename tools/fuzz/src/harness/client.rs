//! The client side of NBD for the harnesses and the seed maker: options and requests encoded
//! from the protocol (not from the server's code), and option replies read back.

use cowdisk::nbd::proto::{IHAVEOPT, OPT_REPLY_MAGIC, REQUEST_MAGIC};
use std::io::{self, Read};

/// An option: `IHAVEOPT`, its number, the length of `data`, `data`.
pub fn opt(o: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_OPT_INFO or NBD_OPT_GO for export `name` with information requests `infos`.
pub fn go(o: u32, name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    opt(o, &d)
}

/// NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT.
pub fn meta(o: u32, name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    opt(o, &d)
}

/// A request header.
pub fn req(flags: u16, typ: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// NBD_CMD_WRITE with its payload.
pub fn write(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = req(flags, 1, cookie, offset, data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// Big-endian integer of up to 8 bytes.
pub fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |a, &x| (a << 8) | u64::from(x))
}

/// One option reply: (option, reply type, payload). Replies longer than `max` are an error
/// (`InvalidData`), as is a bad magic.
pub fn read_option_reply(r: &mut impl Read, max: usize) -> io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)?;
    if be(&h[0..8]) != OPT_REPLY_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad option reply magic {:x?}", &h[0..8])));
    }
    let (o, typ, len) = (be(&h[8..12]) as u32, be(&h[12..16]) as u32, be(&h[16..20]) as usize);
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("option reply of {len} bytes")));
    }
    let mut p = vec![0u8; len];
    r.read_exact(&mut p)?;
    Ok((o, typ, p))
}

/// Splits a client's option stream (after the 4 bytes of client flags) into whole options,
/// as (option, bytes of the whole option); stops at the first bad magic or cut-off option.
pub fn split_options(mut s: &[u8], max_len: u32) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    while s.len() >= 16 && be(&s[0..8]) == IHAVEOPT {
        let (o, len) = (be(&s[8..12]) as u32, be(&s[12..16]) as u32);
        if len > max_len || s.len() < 16 + len as usize {
            break;
        }
        let (whole, rest) = s.split_at(16 + len as usize);
        out.push((o, whole));
        s = rest;
    }
    out
}
