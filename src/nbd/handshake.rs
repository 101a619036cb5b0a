//! The fixed-newstyle handshake: option haggling up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME,
//! including INFO, LIST, ABORT, STRUCTURED_REPLY, EXTENDED_HEADERS, the meta-context options
//! and STARTTLS.
//!
//! A client that breaks the protocol (bad magic, unknown client flags, an option longer than
//! we read at all) is disconnected before anything it asked for is allocated. A client that sends
//! a well-formed option we do not support gets NBD_REP_ERR_UNSUP and may go on.

use super::meta::{self, Context, Offer, Selected};
use super::proto::*;
use super::winding::Winding;
use super::Export;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Largest option payload read into memory. Enough for an export name and a list of
/// meta-context queries (each at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Largest option payload read at all: a longer one than [`MAX_OPTION_LEN`] up to this is read
/// and dropped a piece at a time and answered NBD_REP_ERR_TOO_BIG, as the spec asks of a
/// server ("simply error inbound options"); only past this (qemu-nbd's bound too) is a client
/// taken for hostile and disconnected unread.
pub const MAX_OPTION_DISCARD: u32 = MAX_PAYLOAD;
/// Largest request payload (and read length) we advertise and accept.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
pub const PREFERRED_BLOCK: u32 = 4096;

/// What was agreed when the client moved to transmission.
#[derive(Clone)]
pub struct Negotiated {
    pub export: Arc<Export>,
    /// Replies in chunks: structured replies or extended headers were agreed.
    pub structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS was agreed: 32-byte request and reply headers, 64-bit lengths.
    pub extended: bool,
    /// The metadata contexts selected for this export, in the order selected, with their ids
    /// (1, 2, ... in that order; base:allocation alone is 1).
    pub contexts: Vec<Selected>,
    pub flags: u16,
}

/// How option haggling ended.
pub enum Outcome {
    Transmit(Negotiated),
    /// The client sent NBD_OPT_STARTTLS and got NBD_REP_ACK: the caller upgrades the
    /// stream and calls [`Session::options`] again on the TLS stream.
    StartTls,
    /// The client aborted or asked for something that ends the session.
    Closed,
}

/// TLS policy of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    /// TLS offered; plain-text sessions allowed.
    Optional,
    /// Every option but STARTTLS and ABORT is refused until TLS is up.
    Required,
}

/// State of one client's option haggling.
pub struct Session<'a> {
    exports: &'a [Arc<Export>],
    tls: TlsMode,
    tls_active: bool,
    /// The client set NBD_FLAG_C_FIXED_NEWSTYLE. Without it the spec puts the server in NOTLS
    /// mode: STARTTLS is refused with NBD_REP_ERR_POLICY (the client "MUST NOT" send it), and
    /// a server that requires TLS refuses every option with NBD_REP_ERR_POLICY, never
    /// NBD_REP_ERR_TLS_REQD (which a NOTLS server "MUST NOT" send). Every other option is
    /// answered as to a fixed-newstyle client, which the spec allows.
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// (export name the contexts were selected for, the contexts selected)
    meta: Option<(String, Vec<Context>)>,
    /// The contexts offered besides base:allocation.
    offer: Offer,
    /// Set when the server winds this connection down: options read from then on are
    /// refused with NBD_REP_ERR_SHUTDOWN.
    winding: Arc<Winding>,
}

fn protocol_error(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl<'a> Session<'a> {
    /// Sends the greeting and reads the client flags.
    pub fn start<S: Read + Write>(
        s: &mut S,
        exports: &'a [Arc<Export>],
        tls: TlsMode,
        winding: Arc<Winding>,
    ) -> io::Result<Session<'a>> {
        s.write_all(&greeting())?;
        s.flush()?;
        let mut f = [0u8; 4];
        s.read_exact(&mut f)?;
        let flags = u32::from_be_bytes(f);
        if flags & !KNOWN_CLIENT_FLAGS != 0 {
            return Err(protocol_error("client set unknown handshake flags"));
        }
        Ok(Session {
            exports,
            tls,
            tls_active: false,
            fixed: flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
            structured: false,
            extended: false,
            meta: None,
            offer: Offer::default(),
            winding,
        })
    }

    /// Offers these contexts besides base:allocation (none unless called).
    pub fn offer_contexts(&mut self, offer: Offer) {
        self.offer = offer;
    }

    /// Records that the stream is now TLS. Whatever was negotiated in plain text is forgotten:
    /// the spec says the server MUST NOT preserve negotiation state (structured replies,
    /// extended headers, meta contexts) from before STARTTLS, which a man in the middle could
    /// have injected. The client's NO_ZEROES flag stays: it belongs to the greeting, not to
    /// option haggling.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.meta = None;
    }

    /// Replies come in chunks: structured replies or extended headers.
    fn chunked(&self) -> bool {
        self.structured || self.extended
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.exports.first().cloned();
        }
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    fn transmission_flags(&self, e: &Export) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
        if e.disk.is_read_only() {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.chunked() {
            f |= FLAG_SEND_DF;
        }
        f
    }

    fn negotiated(&self, export: Arc<Export>) -> Negotiated {
        let contexts = match &self.meta {
            Some((name, ctxs)) if self.chunked() && self.find(name).is_some_and(|e| Arc::ptr_eq(&e, &export)) => {
                ctxs.iter().cloned().enumerate().map(|(i, c)| (i as u32 + 1, c)).collect()
            }
            _ => Vec::new(),
        };
        Negotiated {
            flags: self.transmission_flags(&export),
            structured: self.chunked(),
            extended: self.extended,
            contexts,
            export,
        }
    }

    /// Runs option haggling until the client picks an export, starts TLS, or leaves.
    pub fn options<S: Read + Write>(&mut self, s: &mut S) -> io::Result<Outcome> {
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            let (magic, opt, len) = parse_option_header(&h);
            if magic != IHAVEOPT {
                return Err(protocol_error("bad option magic"));
            }
            if len > MAX_OPTION_DISCARD {
                return Err(protocol_error("option longer than the server accepts"));
            }
            // "Issuing this command replaces all previously-set metadata contexts (including
            // when this command fails)": whatever happens to it below, it leaves none before
            // its own (too long, malformed, refused or answered).
            if opt == OPT_SET_META_CONTEXT {
                self.meta = None;
            }
            let reply = |s: &mut S, typ: u32, payload: &[u8]| -> io::Result<()> {
                s.write_all(&option_reply(opt, typ, payload))?;
                s.flush()
            };
            // Spec: an error message is at most 4096 bytes (one naming a long export name
            // would be longer).
            let error = |s: &mut S, typ: u32, msg: &str| reply(s, typ, clip(msg, MAX_STRING).as_bytes());
            // Too long to keep: read and dropped, answered below once the refusals that
            // come first (shutting down, TLS required) are ruled out.
            let data = if len > MAX_OPTION_LEN {
                io::copy(&mut Read::by_ref(s).take(u64::from(len)), &mut io::sink()).and_then(|n| {
                    if n == u64::from(len) {
                        Ok(())
                    } else {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                })?;
                None
            } else {
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data)?;
                Some(data)
            };

            // Spec: a server shutting down "SHOULD error further options received (other than
            // an NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN"; NBD_OPT_EXPORT_NAME has no error
            // reply, so it is hung up on.
            if let Some(why) = self.winding.refusal() {
                match opt {
                    OPT_ABORT => {
                        let _ = reply(s, REP_ACK, &[]);
                        return Ok(Outcome::Closed);
                    }
                    OPT_EXPORT_NAME => return Ok(Outcome::Closed),
                    _ => {
                        error(s, REP_ERR_SHUTDOWN, why)?;
                        continue;
                    }
                }
            }
            // FORCEDTLS: every option but STARTTLS and ABORT, of any length, is refused until
            // TLS is up (spec: "it MUST reply with NBD_REP_ERR_TLS_REQD"), in NOTLS mode
            // with NBD_REP_ERR_POLICY (see `fixed`).
            if self.tls == TlsMode::Required && !self.tls_active && opt != OPT_STARTTLS && opt != OPT_ABORT {
                if opt == OPT_EXPORT_NAME {
                    return Ok(Outcome::Closed);
                }
                if self.fixed {
                    error(s, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")?;
                } else {
                    error(s, REP_ERR_POLICY, "TLS is required, and needs fixed newstyle negotiation")?;
                }
                continue;
            }
            let Some(data) = data else {
                // NBD_OPT_EXPORT_NAME has no error reply: the spec's answer is to hang up.
                if opt == OPT_EXPORT_NAME {
                    return Ok(Outcome::Closed);
                }
                error(
                    s,
                    REP_ERR_TOO_BIG,
                    &format!("option of {len} bytes: this server reads at most {MAX_OPTION_LEN}"),
                )?;
                continue;
            };
            match opt {
                // "A client that has used NBD_OPT_EXTENDED_HEADERS to negotiate extended
                // headers MUST NOT use this option": its reply has no way to say so.
                OPT_EXPORT_NAME if self.extended => return Ok(Outcome::Closed),
                OPT_EXPORT_NAME => {
                    let Some(name) = Payload::new(&data).string(data.len()) else {
                        return Ok(Outcome::Closed);
                    };
                    let Some(export) = self.find(name) else {
                        return Ok(Outcome::Closed);
                    };
                    let n = self.negotiated(export);
                    s.write_all(&export_name_reply(n.export.disk.size(), n.flags, self.no_zeroes))?;
                    s.flush()?;
                    return Ok(Outcome::Transmit(n));
                }
                OPT_ABORT => {
                    // The client may already have closed; a failed ACK changes nothing.
                    let _ = reply(s, REP_ACK, &[]);
                    return Ok(Outcome::Closed);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        error(s, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    for e in self.exports {
                        reply(s, REP_SERVER, &rep_server(&e.name, &e.description))?;
                    }
                    reply(s, REP_ACK, &[])?;
                }
                OPT_STARTTLS => {
                    if !data.is_empty() {
                        error(s, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
                    } else if self.tls == TlsMode::Off {
                        error(s, REP_ERR_UNSUP, "TLS is not configured on this server")?;
                    } else if !self.fixed {
                        error(
                            s,
                            REP_ERR_POLICY,
                            "TLS needs fixed newstyle negotiation: the client did not set NBD_FLAG_C_FIXED_NEWSTYLE",
                        )?;
                    } else if self.tls_active {
                        error(s, REP_ERR_INVALID, "TLS is already active")?;
                    } else {
                        reply(s, REP_ACK, &[])?;
                        return Ok(Outcome::StartTls);
                    }
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, reqs)) = parse_info_request(&data) else {
                        error(s, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")?;
                        continue;
                    };
                    let Some(export) = self.find(name) else {
                        error(s, REP_ERR_UNKNOWN, &format!("no export named '{name}'"))?;
                        continue;
                    };
                    let n = self.negotiated(export);
                    reply(s, REP_INFO, &info_export(n.export.disk.size(), n.flags))?;
                    for r in reqs {
                        match r {
                            INFO_NAME => reply(s, REP_INFO, &info_string(INFO_NAME, &n.export.name))?,
                            // No description is no reply: the spec lets a server omit any
                            // information the client asked for.
                            INFO_DESCRIPTION if !n.export.description.is_empty() => {
                                reply(s, REP_INFO, &info_string(INFO_DESCRIPTION, &n.export.description))?
                            }
                            INFO_BLOCK_SIZE => reply(s, REP_INFO, &info_block_size(1, PREFERRED_BLOCK, MAX_PAYLOAD))?,
                            _ => {}
                        }
                    }
                    reply(s, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(Outcome::Transmit(n));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        error(s, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                        continue;
                    }
                    if self.extended {
                        error(s, REP_ERR_EXT_HEADER_REQD, "extended headers were negotiated and take precedence")?;
                        continue;
                    }
                    self.structured = true;
                    reply(s, REP_ACK, &[])?;
                }
                OPT_EXTENDED_HEADERS => {
                    if !data.is_empty() {
                        error(s, REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")?;
                        continue;
                    }
                    // Asking again changes nothing: it is acknowledged again.
                    self.extended = true;
                    reply(s, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !self.chunked() {
                        error(s, REP_ERR_INVALID, "negotiate structured replies or extended headers first")?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta_request(&data) else {
                        error(s, REP_ERR_INVALID, "malformed meta context request")?;
                        continue;
                    };
                    let Some(export) = self.find(name) else {
                        error(s, REP_ERR_UNKNOWN, &format!("no export named '{name}'"))?;
                        continue;
                    };
                    let list = opt == OPT_LIST_META_CONTEXT;
                    let found = meta::select(&queries, list, &meta::offered(export.disk.as_ref(), self.offer));
                    // Ids as `negotiated` gives them; a listing's ids mean nothing (spec: 0).
                    for (i, c) in found.iter().enumerate() {
                        let id = if list { 0 } else { i as u32 + 1 };
                        reply(s, REP_META_CONTEXT, &rep_meta_context(id, &c.name()))?;
                    }
                    if !list {
                        self.meta = Some((name.to_string(), found));
                    }
                    reply(s, REP_ACK, &[])?;
                }
                _ => error(s, REP_ERR_UNSUP, "option not supported")?,
            }
        }
    }
}
