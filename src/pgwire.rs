//! A small PostgreSQL frontend for replication connections.
//!
//! `tokio-postgres` has no CopyBoth/replication API, so this speaks just enough
//! of the protocol on a tokio socket: SSLRequest and TLS per `sslmode`, startup
//! with `replication=database`, cleartext/MD5/SCRAM-SHA-256(-PLUS) auth, the
//! simple query protocol (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, ...), and
//! the CopyBoth stream of START_REPLICATION: XLogData and keepalives in,
//! standby status updates out. Frontend messages and SCRAM come from
//! `postgres-protocol`; backend messages are parsed here (its parser does not
//! know CopyBothResponse).
//!
//! Reads are cancel-safe: a message is taken off the buffer only when complete,
//! so `recv_copy` can sit in a `select!` next to a timer.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conninfo::{ChannelBinding as Binding, ConnInfo, SslMode, SOURCE_SEARCH_PATH};
use crate::event::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// An error reported by the server (`ErrorResponse`).
#[derive(Debug, Clone)]
pub struct ServerError {
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Replication-connection failures.
#[derive(Debug, thiserror::Error)]
pub enum PgWireError {
    /// Socket trouble (connect, read, write, timeout, server gone).
    #[error("connection to {target}: {source}")]
    Io {
        /// Redacted `host:port`.
        target: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS set-up or handshake failed.
    #[error("TLS to {target}: {message}")]
    Tls {
        /// Redacted `host:port`.
        target: String,
        /// What failed.
        message: String,
    },
    /// The server refused the login or asked for an unsupported method.
    #[error("authentication to {target} failed: {message}")]
    Auth {
        /// Redacted `host:port`.
        target: String,
        /// What failed.
        message: String,
    },
    /// The server reported an error.
    #[error("server error: {0}")]
    Server(ServerError),
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl PgWireError {
    /// What the retry policy ([`crate::retry`]) does about it: I/O is
    /// retried, a server error goes by its SQLSTATE, TLS, authentication and
    /// protocol errors stop.
    pub fn action(&self) -> crate::retry::Action {
        match self {
            PgWireError::Io { .. } => crate::retry::Action::Retry,
            PgWireError::Server(e) => crate::retry::sqlstate(&e.code),
            PgWireError::Tls { .. } | PgWireError::Auth { .. } | PgWireError::Protocol(_) => {
                crate::retry::Action::Stop
            }
        }
    }

    /// The SQLSTATE, for a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgWireError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// One message from the CopyBoth stream.
#[derive(Debug)]
pub enum CopyMessage {
    /// `w`: WAL data starting at `start`, with the server's WAL end.
    XLogData {
        /// Start of the data in WAL.
        start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// `k`: keepalive; `reply` asks for a status update now.
    Keepalive {
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Reply requested.
        reply: bool,
    },
    /// The server ended the copy stream.
    Done,
}

/// A connection speaking the frontend protocol.
pub struct PgConn {
    socket: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    target: String,
    /// Server parameters from `ParameterStatus` (server_version, ...).
    pub params: HashMap<String, String>,
}

impl fmt::Debug for PgConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConn")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A backend message: tag and body.
struct Message {
    tag: u8,
    body: Bytes,
}

impl PgConn {
    /// Connects and logs in. With `replication`, the session is a logical
    /// replication connection (`replication=database`).
    pub async fn connect(info: &ConnInfo, replication: bool) -> Result<PgConn, PgWireError> {
        let target = format!("{}:{}", info.host, info.port);
        let io_err = |source| PgWireError::Io {
            target: target.clone(),
            source,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(info.connect_timeout_s.max(1)),
            TcpStream::connect((info.host.as_str(), info.port)),
        )
        .await
        .map_err(|_| {
            io_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let (socket, cert) = negotiate_tls(tcp, info, &target).await?;
        let mut conn = PgConn {
            socket,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::new(),
            target,
            params: HashMap::new(),
        };
        conn.startup(info, replication, cert).await?;
        Ok(conn)
    }

    fn io(&self, source: std::io::Error) -> PgWireError {
        PgWireError::Io {
            target: self.target.clone(),
            source,
        }
    }

    async fn flush(&mut self) -> Result<(), PgWireError> {
        let buf = self.wbuf.split();
        self.socket.write_all(&buf).await.map_err(|e| self.io(e))?;
        self.socket.flush().await.map_err(|e| self.io(e))
    }

    async fn startup(
        &mut self,
        info: &ConnInfo,
        replication: bool,
        cert: Option<Vec<u8>>,
    ) -> Result<(), PgWireError> {
        let search_path = format!("-c search_path={SOURCE_SEARCH_PATH}");
        let mut params = vec![
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("application_name", info.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // pgoutput sends values in the walsender's text format: make it
            // canonical so that stream and snapshot values are identical.
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO, YMD"),
            ("extra_float_digits", "3"),
            ("IntervalStyle", "iso_8601"),
            // Nothing a database user planted on the default search path is
            // ever resolved by this session (`conninfo::SOURCE_SEARCH_PATH`).
            ("options", search_path.as_str()),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| self.io(e))?;
        self.flush().await?;
        let auth_err = |target: &str, m: String| PgWireError::Auth {
            target: target.to_owned(),
            message: m,
        };
        let mut scram: Option<ScramSha256> = None;
        // The server proved itself in SCRAM (its signature checked), and
        // whether that exchange was bound to the TLS channel.
        let (mut scram_done, mut bound) = (false, false);
        let encrypted = cert.is_some();
        let clear_refused = |target: &str, how: &str| {
            auth_err(
                target,
                format!(
                    "the server asks for the password {how} over an unencrypted connection; Tributary sends it \
                     so only with sslmode=disable chosen explicitly (enable ssl on the server, or set sslmode=disable)"
                ),
            )
        };
        loop {
            let msg = self.read_message().await?;
            match msg.tag {
                b'R' => {
                    let mut b = msg.body.clone();
                    let kind = get_i32(&mut b)?;
                    let password = || {
                        info.password.as_deref().ok_or_else(|| {
                            auth_err(&self.target, "the server asks for a password and the URL has none (use ${VAR} in the URL)".into())
                        })
                    };
                    if matches!(kind, 3 | 5) && info.channel_binding == Binding::Require {
                        return Err(auth_err(
                            &self.target,
                            "channel_binding=require, but the server asks for a password instead of SCRAM"
                                .into(),
                        ));
                    }
                    match kind {
                        0 => {
                            if scram.is_some() && !scram_done {
                                return Err(auth_err(
                                    &self.target,
                                    "the server accepted the login before it proved in SCRAM that it knows \
                                     the password; refusing the connection"
                                        .into(),
                                ));
                            }
                            if info.channel_binding == Binding::Require && !bound {
                                return Err(auth_err(
                                    &self.target,
                                    "channel_binding=require, but the server accepted the login without a \
                                     SCRAM exchange bound to the TLS channel"
                                        .into(),
                                ));
                            }
                        }
                        3 if !encrypted && info.sslmode != SslMode::Disable => {
                            return Err(clear_refused(&self.target, "in clear"));
                        }
                        5 if !encrypted && info.sslmode != SslMode::Disable => {
                            return Err(clear_refused(&self.target, "as MD5"));
                        }
                        3 => {
                            frontend::password_message(password()?.as_bytes(), &mut self.wbuf)
                                .map_err(|e| self.io(e))?;
                            self.flush().await?;
                        }
                        5 => {
                            if b.remaining() < 4 {
                                return Err(PgWireError::Protocol("short MD5 salt".into()));
                            }
                            let salt = [b[0], b[1], b[2], b[3]];
                            let hashed = postgres_protocol::authentication::md5_hash(
                                info.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hashed.as_bytes(), &mut self.wbuf)
                                .map_err(|e| self.io(e))?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechs: Vec<String> = b
                                .split(|c| *c == 0)
                                .filter(|m| !m.is_empty())
                                .map(|m| String::from_utf8_lossy(m).into_owned())
                                .collect();
                            let pw = password()?.as_bytes().to_vec();
                            let plus = mechs.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                            let (mech, binding) = match (&cert, plus, info.channel_binding) {
                                (_, _, Binding::Disable) => {
                                    (SCRAM_SHA_256, ChannelBinding::unsupported())
                                }
                                (Some(der), true, _) => (
                                    SCRAM_SHA_256_PLUS,
                                    ChannelBinding::tls_server_end_point(end_point_hash(der)),
                                ),
                                (_, _, Binding::Require) => {
                                    return Err(auth_err(
                                        &self.target,
                                        "channel_binding=require, but the connection is not TLS or the server \
                                         does not offer SCRAM-SHA-256-PLUS"
                                            .into(),
                                    ))
                                }
                                (Some(_), false, _) => {
                                    (SCRAM_SHA_256, ChannelBinding::unrequested())
                                }
                                (None, _, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                            };
                            bound = mech == SCRAM_SHA_256_PLUS;
                            if !mechs
                                .iter()
                                .any(|m| m == SCRAM_SHA_256 || m == SCRAM_SHA_256_PLUS)
                            {
                                return Err(auth_err(
                                    &self.target,
                                    format!("unsupported SASL mechanisms {mechs:?}"),
                                ));
                            }
                            let s = ScramSha256::new(&pw, binding);
                            frontend::sasl_initial_response(mech, s.message(), &mut self.wbuf)
                                .map_err(|e| self.io(e))?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                PgWireError::Protocol("SASL continue without start".into())
                            })?;
                            s.update(&b)
                                .map_err(|e| auth_err(&self.target, format!("SCRAM: {e}")))?;
                            let out = s.message().to_vec();
                            frontend::sasl_response(&out, &mut self.wbuf)
                                .map_err(|e| self.io(e))?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                PgWireError::Protocol("SASL final without start".into())
                            })?;
                            s.finish(&b).map_err(|e| {
                                auth_err(&self.target, format!("SCRAM server signature: {e}"))
                            })?;
                            scram_done = true;
                        }
                        other => {
                            return Err(auth_err(
                                &self.target,
                                format!("unsupported authentication method {other}"),
                            ))
                        }
                    }
                }
                b'E' => {
                    let e = parse_error(&msg.body);
                    return Err(if e.code.starts_with("28") {
                        auth_err(&self.target, e.to_string())
                    } else {
                        PgWireError::Server(e)
                    });
                }
                b'S' => {
                    let mut parts = msg.body.split(|c| *c == 0);
                    if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                        self.params.insert(
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                t => {
                    return Err(PgWireError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    )))
                }
            }
        }
    }

    /// Reads one whole backend message (cancel-safe).
    async fn read_message(&mut self) -> Result<Message, PgWireError> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| *l >= 4)
                    .ok_or_else(|| PgWireError::Protocol(format!("bad message length {len}")))?;
                if self.rbuf.len() > len {
                    let mut frame = self.rbuf.split_to(len + 1).freeze();
                    let tag = frame.get_u8();
                    frame.advance(4);
                    return Ok(Message { tag, body: frame });
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            }
            let n = self
                .socket
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    /// Runs one statement with the simple query protocol; returns the rows of
    /// its (last) result set as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, PgWireError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| self.io(e))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = self.read_message().await?;
            match msg.tag {
                b'T' => rows.clear(),
                b'D' => rows.push(parse_data_row(&msg.body)?),
                b'E' => error = Some(parse_error(&msg.body)),
                b'Z' => return error.map_or(Ok(rows), |e| Err(PgWireError::Server(e))),
                b'C' | b'N' | b'S' | b'I' => {}
                t => {
                    return Err(PgWireError::Protocol(format!(
                        "unexpected message {:?} in simple query",
                        t as char
                    )))
                }
            }
        }
    }

    /// Sends `START_REPLICATION ...` and waits for CopyBothResponse.
    pub async fn start_replication(&mut self, sql: &str) -> Result<(), PgWireError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| self.io(e))?;
        self.flush().await?;
        loop {
            let msg = self.read_message().await?;
            match msg.tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = parse_error(&msg.body);
                    // drain to ReadyForQuery so the error is complete
                    return Err(PgWireError::Server(e));
                }
                b'N' | b'S' => {}
                t => {
                    return Err(PgWireError::Protocol(format!(
                        "unexpected message {:?} starting replication",
                        t as char
                    )))
                }
            }
        }
    }

    /// Next message of the CopyBoth stream (cancel-safe).
    pub async fn recv_copy(&mut self) -> Result<CopyMessage, PgWireError> {
        loop {
            let msg = self.read_message().await?;
            match msg.tag {
                b'd' => {
                    let mut b = msg.body;
                    if !b.has_remaining() {
                        return Err(PgWireError::Protocol("empty CopyData".into()));
                    }
                    match b.get_u8() {
                        b'w' => {
                            if b.remaining() < 24 {
                                return Err(PgWireError::Protocol("short XLogData header".into()));
                            }
                            let start = Lsn(b.get_u64());
                            let wal_end = Lsn(b.get_u64());
                            let _clock = b.get_i64();
                            return Ok(CopyMessage::XLogData {
                                start,
                                wal_end,
                                data: b,
                            });
                        }
                        b'k' => {
                            if b.remaining() < 17 {
                                return Err(PgWireError::Protocol("short keepalive".into()));
                            }
                            let wal_end = Lsn(b.get_u64());
                            let _clock = b.get_i64();
                            let reply = b.get_u8() == 1;
                            return Ok(CopyMessage::Keepalive { wal_end, reply });
                        }
                        t => {
                            return Err(PgWireError::Protocol(format!(
                                "unknown CopyData kind {:?}",
                                t as char
                            )))
                        }
                    }
                }
                // A walsender that shuts down ends the stream with CommandComplete
                // (and ReadyForQuery), without a CopyDone first.
                b'c' | b'C' | b'Z' => return Ok(CopyMessage::Done),
                b'E' => return Err(PgWireError::Server(parse_error(&msg.body))),
                b'N' | b'S' => {}
                t => {
                    return Err(PgWireError::Protocol(format!(
                        "unexpected message {:?} in copy stream",
                        t as char
                    )))
                }
            }
        }
    }

    /// Standby status update: everything up to `flushed` is durably applied.
    /// Write and flush positions are both `flushed`: Tributary never reports a
    /// position it has not committed to the profile store.
    pub async fn send_status(&mut self, flushed: Lsn, reply: bool) -> Result<(), PgWireError> {
        let now_us = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros(),
        )
        .unwrap_or(i64::MAX);
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(flushed.0);
        body.put_u64(flushed.0);
        body.put_u64(flushed.0);
        body.put_i64(now_us - PG_EPOCH_OFFSET_US);
        body.put_u8(u8::from(reply));
        frontend::CopyData::new(body.freeze())
            .map_err(|e| self.io(e))?
            .write(&mut self.wbuf);
        self.flush().await
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }
}

fn get_i32(b: &mut Bytes) -> Result<i32, PgWireError> {
    if b.remaining() < 4 {
        return Err(PgWireError::Protocol("short message".into()));
    }
    Ok(b.get_i32())
}

fn parse_data_row(body: &Bytes) -> Result<Vec<Option<String>>, PgWireError> {
    let mut b = body.clone();
    if b.remaining() < 2 {
        return Err(PgWireError::Protocol("short DataRow".into()));
    }
    let n = b.get_u16();
    let mut out = Vec::with_capacity(n.into());
    for _ in 0..n {
        let len = get_i32(&mut b)?;
        if len < 0 {
            out.push(None);
        } else {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if b.remaining() < len {
                return Err(PgWireError::Protocol("short DataRow value".into()));
            }
            out.push(Some(String::from_utf8_lossy(&b.split_to(len)).into_owned()));
        }
    }
    Ok(out)
}

fn parse_error(body: &Bytes) -> ServerError {
    let mut e = ServerError {
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    for field in body.split(|c| *c == 0) {
        if field.is_empty() {
            continue;
        }
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

/// `tls-server-end-point` channel binding: the certificate hashed with the hash
/// of its signature algorithm (SHA-256 for MD5/SHA-1/SHA-256, per RFC 5929).
fn end_point_hash(der: &[u8]) -> Vec<u8> {
    const SHA384_OIDS: [&[u8]; 2] = [
        &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0C],
        &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03],
    ];
    const SHA512_OIDS: [&[u8]; 2] = [
        &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0D],
        &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x04],
    ];
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    if SHA512_OIDS.iter().any(|o| has(o)) {
        sha2::Sha512::digest(der).to_vec()
    } else if SHA384_OIDS.iter().any(|o| has(o)) {
        sha2::Sha384::digest(der).to_vec()
    } else {
        sha2::Sha256::digest(der).to_vec()
    }
}

/// SSLRequest and TLS handshake as `sslmode` says. Returns the socket and, on
/// TLS, the server's certificate (for SCRAM channel binding).
async fn negotiate_tls(
    mut tcp: TcpStream,
    info: &ConnInfo,
    target: &str,
) -> Result<(Box<dyn Socket>, Option<Vec<u8>>), PgWireError> {
    let io_err = |source| PgWireError::Io {
        target: target.to_owned(),
        source,
    };
    if info.sslmode == SslMode::Disable {
        return Ok((Box::new(tcp), None));
    }
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io_err)?;
    let answer = tcp.read_u8().await.map_err(io_err)?;
    if answer != b'S' {
        return match info.sslmode {
            SslMode::Allow | SslMode::Prefer if info.password.is_some() => Err(PgWireError::Tls {
                target: target.to_owned(),
                message: "the server does not accept TLS and the URL has a password: Tributary sends a \
                          password only over TLS unless sslmode=disable is chosen explicitly (enable ssl on \
                          the server, or set sslmode=disable)"
                    .into(),
            }),
            SslMode::Allow | SslMode::Prefer => Ok((Box::new(tcp), None)),
            _ => Err(PgWireError::Tls {
                target: target.to_owned(),
                message: format!("the server does not accept TLS but sslmode={:?} requires it (enable ssl on the server or lower sslmode)", info.sslmode),
            }),
        };
    }
    let config = tls_config(info).map_err(|message| PgWireError::Tls {
        target: target.to_owned(),
        message,
    })?;
    let name = ServerName::try_from(info.host.clone()).map_err(|e| PgWireError::Tls {
        target: target.to_owned(),
        message: format!("invalid server name: {e}"),
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| PgWireError::Tls {
            target: target.to_owned(),
            message: format!("handshake failed: {e}"),
        })?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    Ok((Box::new(tls), cert))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(info: &ConnInfo) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if let Some(path) = &info.sslrootcert {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in rustls_pemfile_certs(&pem) {
            roots
                .add(cert)
                .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "no PEM certificate found in sslrootcert {}",
                path.display()
            ));
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err("no root certificates: set sslrootcert=/path/to/ca.pem in the URL".into());
        }
    }
    Ok(roots)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

fn tls_config(info: &ConnInfo) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match info.sslmode {
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(info)?)
            .with_no_client_auth(),
        // libpq: with a root certificate given, require checks the chain as
        // verify-ca does.
        SslMode::VerifyCa | SslMode::Require
            if info.sslmode == SslMode::VerifyCa || info.sslrootcert.is_some() =>
        {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(info)?),
                provider(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner: Some(inner) }))
                .with_no_client_auth()
        }
        _ => {
            // require/prefer/allow: encrypted, certificate not checked (libpq semantics).
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner: None }))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// verify-ca (chain checked, host name not) and require (chain not checked);
/// the handshake signatures are always verified.
#[derive(Debug)]
struct ChainOnly {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
