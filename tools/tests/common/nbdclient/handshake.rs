//! The handshake phase of the client: greeting, options (list, info/go, structured replies, extended headers, meta contexts, export name, abort).

use std::io;

use super::parse::Parser;
use super::types::invalid;
use super::*;

impl<S: NbdStream> NbdClient<S> {
    // ---- greeting ----------------------------------------------------------

    /// Reads the greeting and answers with `NBD_FLAG_C_FIXED_NEWSTYLE`, plus
    /// `NBD_FLAG_C_NO_ZEROES` when the server offered it.
    pub fn handshake(&mut self) -> io::Result<u16> {
        let flags = self.read_greeting()?;
        let mut client = 0;
        if flags & NBD_FLAG_FIXED_NEWSTYLE != 0 {
            client |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if flags & NBD_FLAG_NO_ZEROES != 0 {
            client |= NBD_FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(client)?;
        Ok(flags)
    }

    /// Reads `NBDMAGIC`, `IHAVEOPT` and the 16-bit handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let magic = self.read_u64()?;
        if magic != NBDMAGIC {
            return Err(invalid(format!("greeting starts with {magic:#x}, not NBDMAGIC")));
        }
        let second = self.read_u64()?;
        if second == CLISERV_MAGIC {
            return Err(invalid("server speaks oldstyle negotiation"));
        }
        if second != IHAVEOPT {
            return Err(invalid(format!("greeting has {second:#x} where IHAVEOPT belongs")));
        }
        self.handshake_flags = self.read_u16()?;
        Ok(self.handshake_flags)
    }

    /// Sends any 32-bit client flags, including ones the spec forbids.
    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.client_flags = flags;
        self.stream.write_all(&flags.to_be_bytes())?;
        self.stream.flush()
    }

    // ---- raw options -------------------------------------------------------

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.send_option_raw(IHAVEOPT, option, data.len() as u32, data)
    }

    /// Sends an option header with any magic and declared length, followed by
    /// `data` verbatim (which need not match the declared length).
    pub fn send_option_raw(&mut self, magic: u64, option: u32, declared_len: u32, data: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&magic.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&declared_len.to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg)?;
        self.stream.flush()
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let magic = self.read_u64()?;
        if magic != NBD_OPT_REPLY_MAGIC {
            return Err(invalid(format!("option reply magic is {magic:#x}")));
        }
        let option = self.read_u32()?;
        let reply_type = self.read_u32()?;
        let len = self.read_u32()?;
        if len > MAX_OPTION_REPLY {
            return Err(invalid(format!("option reply claims {len} bytes of data")));
        }
        let data = self.read_vec(len as usize)?;
        Ok(OptionReply { option, reply_type, data })
    }

    /// Sends an option and collects its replies up to the final ACK or error,
    /// checking that every reply echoes the option.
    pub fn option_exchange(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptionReply>> {
        self.send_option(option, data)?;
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply()?;
            if reply.option != option {
                return Err(invalid(format!("reply to {} echoes option {}", opt_name(option), reply.option)));
            }
            let last = reply.is_final();
            replies.push(reply);
            if last {
                return Ok(replies);
            }
        }
    }

    /// Like [`Self::option_exchange`] but turns a final error reply into a [`RepError`].
    fn option_expect_ack(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptionReply>> {
        let mut replies = self.option_exchange(option, data)?;
        let last = replies.pop().ok_or_else(|| invalid("no option reply"))?;
        if last.is_error() {
            return Err(io::Error::other(last.to_rep_error()));
        }
        Ok(replies)
    }

    // ---- option wrappers ---------------------------------------------------

    pub fn opt_list(&mut self) -> io::Result<Vec<ListedExport>> {
        let replies = self.option_expect_ack(NBD_OPT_LIST, &[])?;
        let mut out = Vec::new();
        for r in replies {
            if r.reply_type != NBD_REP_SERVER {
                return Err(invalid(format!("NBD_OPT_LIST answered with {}", rep_name(r.reply_type))));
            }
            let mut p = Parser::new(&r.data);
            let n = p.u32()? as usize;
            let name = p.string(n)?;
            let description = p.string(p.remaining())?;
            out.push(ListedExport { name, description });
        }
        Ok(out)
    }

    /// `NBD_OPT_INFO`/`NBD_OPT_GO` option data: name and information requests.
    pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    pub fn opt_info(&mut self, name: &str, requests: &[u16]) -> io::Result<ExportInfo> {
        self.info_or_go(NBD_OPT_INFO, name, requests)
    }

    /// On success the connection is in transmission phase.
    pub fn opt_go(&mut self, name: &str, requests: &[u16]) -> io::Result<ExportInfo> {
        let info = self.info_or_go(NBD_OPT_GO, name, requests)?;
        self.export = Some(info.clone());
        Ok(info)
    }

    fn info_or_go(&mut self, option: u32, name: &str, requests: &[u16]) -> io::Result<ExportInfo> {
        let replies = self.option_expect_ack(option, &Self::info_payload(name, requests))?;
        let mut info = ExportInfo::default();
        let mut saw_export = false;
        for r in replies {
            if r.reply_type != NBD_REP_INFO {
                return Err(invalid(format!("{} answered with {}", opt_name(option), rep_name(r.reply_type))));
            }
            let mut p = Parser::new(&r.data);
            let info_type = p.u16()?;
            match info_type {
                NBD_INFO_EXPORT => {
                    if r.data.len() != 12 {
                        return Err(invalid(format!("NBD_INFO_EXPORT has length {}", r.data.len())));
                    }
                    info.size = p.u64()?;
                    info.transmission_flags = p.u16()?;
                    saw_export = true;
                }
                NBD_INFO_NAME => info.name = Some(p.string(p.remaining())?),
                NBD_INFO_DESCRIPTION => info.description = Some(p.string(p.remaining())?),
                NBD_INFO_BLOCK_SIZE => {
                    if r.data.len() != 14 {
                        return Err(invalid(format!("NBD_INFO_BLOCK_SIZE has length {}", r.data.len())));
                    }
                    info.block_size = Some((p.u32()?, p.u32()?, p.u32()?));
                }
                other => info.unknown.push((other, p.rest().to_vec())),
            }
        }
        if !saw_export {
            return Err(invalid(format!("{} succeeded without NBD_INFO_EXPORT", opt_name(option))));
        }
        Ok(info)
    }

    /// `NBD_OPT_EXTENDED_HEADERS`; on ACK every request and reply from then on uses the
    /// 32-byte headers.
    pub fn opt_extended_headers(&mut self) -> io::Result<()> {
        let replies = self.option_expect_ack(NBD_OPT_EXTENDED_HEADERS, &[])?;
        if !replies.is_empty() {
            return Err(invalid("NBD_OPT_EXTENDED_HEADERS answered with more than an ACK"));
        }
        self.extended = true;
        Ok(())
    }

    pub fn opt_structured_reply(&mut self) -> io::Result<()> {
        let replies = self.option_expect_ack(NBD_OPT_STRUCTURED_REPLY, &[])?;
        if !replies.is_empty() {
            return Err(invalid("NBD_OPT_STRUCTURED_REPLY answered with more than an ACK"));
        }
        self.structured = true;
        Ok(())
    }

    /// Option data shared by LIST_META_CONTEXT and SET_META_CONTEXT.
    pub fn meta_context_payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    pub fn opt_list_meta_context(&mut self, export: &str, queries: &[&str]) -> io::Result<Vec<MetaContext>> {
        self.meta_context(NBD_OPT_LIST_META_CONTEXT, export, queries)
    }

    pub fn opt_set_meta_context(&mut self, export: &str, queries: &[&str]) -> io::Result<Vec<MetaContext>> {
        // The spec says SET replaces the selection even when it fails.
        self.meta_contexts.clear();
        let contexts = self.meta_context(NBD_OPT_SET_META_CONTEXT, export, queries)?;
        self.meta_contexts = contexts.clone();
        Ok(contexts)
    }

    fn meta_context(&mut self, option: u32, export: &str, queries: &[&str]) -> io::Result<Vec<MetaContext>> {
        let replies = self.option_expect_ack(option, &Self::meta_context_payload(export, queries))?;
        let mut out = Vec::new();
        for r in replies {
            if r.reply_type != NBD_REP_META_CONTEXT {
                return Err(invalid(format!("{} answered with {}", opt_name(option), rep_name(r.reply_type))));
            }
            let mut p = Parser::new(&r.data);
            let id = p.u32()?;
            let name = p.string(p.remaining())?;
            out.push(MetaContext { id, name });
        }
        Ok(out)
    }

    /// Old-style way into transmission. A server refusing the name must hang
    /// up, which shows here as an `UnexpectedEof` error.
    pub fn opt_export_name(&mut self, name: &str) -> io::Result<ExportInfo> {
        self.send_option(NBD_OPT_EXPORT_NAME, name.as_bytes())?;
        let size = self.read_u64()?;
        let transmission_flags = self.read_u16()?;
        if self.client_flags & NBD_FLAG_C_NO_ZEROES == 0 {
            self.read_vec(EXPORT_NAME_ZERO_PAD)?;
        }
        let info = ExportInfo { size, transmission_flags, ..Default::default() };
        self.export = Some(info.clone());
        Ok(info)
    }

    /// Sends `NBD_OPT_ABORT` and returns the server's reply, or `None` when it
    /// just closed the connection (which the spec tolerates).
    pub fn opt_abort(&mut self) -> io::Result<Option<OptionReply>> {
        self.send_option(NBD_OPT_ABORT, &[])?;
        match self.read_option_reply() {
            Ok(r) => Ok(Some(r)),
            Err(e) if is_disconnect(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
