//! Strict parsing of server-supplied bytes: structured reply chunks, and a bounds-checked big-endian reader that turns every short or malformed field into `InvalidData`.

use std::io;

use super::consts::*;
use super::types::*;

pub(super) fn parse_chunk(chunk_type: u16, flags: u16, payload: &[u8]) -> io::Result<ChunkKind> {
    let len = payload.len();
    let mut p = Parser::new(payload);
    let kind = match chunk_type {
        NBD_REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(invalid(format!("NBD_REPLY_TYPE_NONE with {len} bytes of payload")));
            }
            if flags & NBD_REPLY_FLAG_DONE == 0 {
                return Err(invalid("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE"));
            }
            ChunkKind::None
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            if len < 9 {
                return Err(invalid(format!("NBD_REPLY_TYPE_OFFSET_DATA with length {len}")));
            }
            ChunkKind::OffsetData { offset: p.u64()?, data: p.rest().to_vec() }
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if len != 12 {
                return Err(invalid(format!("NBD_REPLY_TYPE_OFFSET_HOLE with length {len}")));
            }
            let offset = p.u64()?;
            let length = p.u32()?;
            if length == 0 {
                return Err(invalid("NBD_REPLY_TYPE_OFFSET_HOLE of size 0"));
            }
            ChunkKind::OffsetHole { offset, length }
        }
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT => {
            if len < 24 || !(len - 8).is_multiple_of(16) {
                return Err(invalid(format!("NBD_REPLY_TYPE_BLOCK_STATUS_EXT with length {len}")));
            }
            let context_id = p.u32()?;
            let count = p.u32()? as usize;
            if count != (len - 8) / 16 {
                return Err(invalid(format!(
                    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT counts {count} descriptors in {len} bytes"
                )));
            }
            let mut extents = Vec::with_capacity(count);
            while p.remaining() > 0 {
                let length = p.u64()?;
                let flags = p.u64()?;
                if length == 0 {
                    return Err(invalid("block status extent of length 0"));
                }
                extents.push((length, flags));
            }
            ChunkKind::BlockStatusExt { context_id, extents }
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            if len < 12 || (len - 4) & 7 != 0 {
                return Err(invalid(format!("NBD_REPLY_TYPE_BLOCK_STATUS with length {len}")));
            }
            let context_id = p.u32()?;
            let mut extents = Vec::with_capacity((len - 4) / 8);
            while p.remaining() > 0 {
                let length = p.u32()?;
                let flags = p.u32()?;
                if length == 0 {
                    return Err(invalid("block status extent of length 0"));
                }
                extents.push(Extent { length, flags });
            }
            ChunkKind::BlockStatus { context_id, extents }
        }
        t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
            if len < 6 {
                return Err(invalid(format!("error chunk {t:#x} with length {len}")));
            }
            let error = p.u32()?;
            let msg_len = p.u16()? as usize;
            let tail = if t == NBD_REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if msg_len + tail > p.remaining() {
                return Err(invalid(format!(
                    "error chunk {t:#x}: message length {msg_len} does not fit in length {len}"
                )));
            }
            let message = p.string(msg_len)?;
            if error == 0 {
                return Err(invalid(format!("error chunk {t:#x} with error value 0")));
            }
            match t {
                NBD_REPLY_TYPE_ERROR => {
                    if p.remaining() != 0 {
                        return Err(invalid("NBD_REPLY_TYPE_ERROR with trailing bytes"));
                    }
                    ChunkKind::Error { error, message }
                }
                NBD_REPLY_TYPE_ERROR_OFFSET => {
                    let offset = p.u64()?;
                    if p.remaining() != 0 {
                        return Err(invalid("NBD_REPLY_TYPE_ERROR_OFFSET with trailing bytes"));
                    }
                    ChunkKind::ErrorOffset { error, message, offset }
                }
                _ => ChunkKind::UnknownError { chunk_type: t, error, message },
            }
        }
        // The spec requires a hard disconnect on unknown non-error chunks.
        t => return Err(invalid(format!("unknown structured reply type {t:#x}"))),
    };
    Ok(kind)
}

/// Bounds-checked big-endian reader over server-supplied bytes.
pub(super) struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Parser { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(invalid(format!(
                "server data too short: wanted {n} more bytes at offset {}, have {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub(super) fn u16(&mut self) -> io::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self) -> io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    pub(super) fn string(&mut self, n: usize) -> io::Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid("server string is not UTF-8"))
    }
}
