//! TLS on the shard (SPEC §1 `tls_cert_file`): the handshake, driven without blocking over the
//! connection's socket and bounded in time by the caller, and [`Tls`], the user-space transport:
//! rustls encrypts and decrypts around the same non-blocking socket calls plain TCP makes, so
//! HTTP, `/ws` and `/socket.io/` run over it unchanged (through `transport::Stream`).
//!
//! rustls's unbuffered API: the buffers are ours — the ciphertext read and not yet processed,
//! the plaintext decrypted and not yet read, the records made and not yet sent — and each is
//! freed as soon as it is empty, so an idle TLS connection holds its keys and state, no buffer.
//! Records leave in order: while an io_uring write of ciphertext is in flight nothing else is
//! sent on the socket (records made meanwhile wait and go with the next write). Decrypted bytes
//! not read yet are reported by [`Tls::buffered`] (the socket's readiness does not show them).
//!
//! Must not: block the shard, hold a `RefCell` borrow across an await, or write a record while
//! another write is in flight.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

use crate::sys::{self, Shutdown};

/// What the engine needs to serve TLS on its listener.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The server's rustls configuration: certificate chain, key, versions, ALPN. Replaced at
    /// run time through `Control::set_tls_config` (new handshakes use the new one).
    pub config: Arc<ServerConfig>,
    /// A handshake not finished within this is cut.
    pub handshake_timeout: Duration,
}

/// Most ciphertext read per `recv`: one whole record with its header and tag.
const READ_CHUNK: usize = 16 * 1024 + 512;

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Frees a buffer once it is empty (an idle connection keeps none).
fn release_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = Vec::new();
    }
}

/// A TLS connection in user space.
pub(crate) struct Tls {
    stream: UnsafeCell<TcpStream>,
    conn: RefCell<UnbufferedServerConnection>,
    /// Ciphertext read and not yet processed.
    incoming: RefCell<Vec<u8>>,
    /// Decrypted bytes not read yet.
    plaintext: RefCell<Vec<u8>>,
    /// Records made and not yet sent.
    outgoing: RefCell<Vec<u8>>,
    /// The handshake has finished.
    ready: Cell<bool>,
    /// The peer ended the stream (close_notify or TCP end).
    ended: Cell<bool>,
    /// An io_uring write of ciphertext is in flight.
    writing: Cell<bool>,
}

impl Tls {
    /// Runs the server side of the handshake on `stream` (the caller bounds it in time).
    pub(crate) async fn accept(
        stream: TcpStream,
        config: Arc<ServerConfig>,
    ) -> std::io::Result<Tls> {
        let _ = stream.set_nodelay(true);
        let conn = UnbufferedServerConnection::new(config).map_err(std::io::Error::other)?;
        let tls = Tls {
            stream: UnsafeCell::new(stream),
            conn: RefCell::new(conn),
            incoming: RefCell::new(Vec::new()),
            plaintext: RefCell::new(Vec::new()),
            outgoing: RefCell::new(Vec::new()),
            ready: Cell::new(false),
            ended: Cell::new(false),
            writing: Cell::new(false),
        };
        loop {
            let driven = tls.drive(None);
            // Whatever was made (an alert included) goes out before an error is told.
            tls.write_pending().await?;
            driven?;
            if tls.ready.get() {
                return Ok(tls);
            }
            if tls.ended.get() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            sys::stream_ref(&tls.stream).readable(false).await?;
            match tls.read_socket() {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends what the socket holds to the incoming ciphertext: the end of the TCP stream
    /// marks the connection ended, `WouldBlock` when nothing has arrived.
    fn read_socket(&self) -> std::io::Result<()> {
        let mut incoming = self.incoming.borrow_mut();
        // Into spare capacity: nothing is zeroed first.
        incoming.reserve(READ_CHUNK);
        let read = sys::recv_now(sys::stream_ref(&self.stream), &mut incoming);
        release_if_empty(&mut incoming);
        match read {
            Ok(0) => {
                self.ended.set(true);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs rustls's state machine over the incoming ciphertext: decrypted bytes go to
    /// `plaintext`, records to make go to `outgoing`; `plain` (when given, once the handshake
    /// is over) is encrypted into `outgoing`. Returns whether `plain` was taken.
    fn drive(&self, plain: Option<&[u8]>) -> std::io::Result<bool> {
        let mut conn = self.conn.borrow_mut();
        let mut incoming = self.incoming.borrow_mut();
        let mut outgoing = self.outgoing.borrow_mut();
        let mut taken = false;
        loop {
            let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming);
            let mut stop = false;
            match state.map_err(invalid)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    let mut plaintext = self.plaintext.borrow_mut();
                    while let Some(record) = traffic.next_record() {
                        plaintext.extend_from_slice(record.map_err(invalid)?.payload);
                    }
                }
                ConnectionState::ReadEarlyData(mut early) => {
                    // Never enabled; drained if it comes.
                    while early.next_record().is_some() {}
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let start = outgoing.len();
                    outgoing.resize(start + 4096, 0);
                    let made = match encode.encode(&mut outgoing[start..]) {
                        Err(EncodeError::InsufficientSize(e)) => {
                            outgoing.resize(start + e.required_size, 0);
                            encode.encode(&mut outgoing[start..])
                        }
                        other => other,
                    };
                    match made {
                        Ok(n) => outgoing.truncate(start + n),
                        Err(e) => {
                            outgoing.truncate(start);
                            return Err(invalid(e));
                        }
                    }
                }
                // The records are queued in `outgoing`, in order; they go with the next write.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(mut traffic) => {
                    self.ready.set(true);
                    if let Some(data) = plain.filter(|_| !taken) {
                        let start = outgoing.len();
                        // Records add a header and a tag per 16 KiB.
                        let room = data.len() + (data.len() / 16384 + 1) * 64;
                        outgoing.resize(start + room, 0);
                        match traffic.encrypt(data, &mut outgoing[start..]) {
                            Ok(n) => outgoing.truncate(start + n),
                            Err(EncryptError::InsufficientSize(e)) => {
                                outgoing.resize(start + e.required_size, 0);
                                match traffic.encrypt(data, &mut outgoing[start..]) {
                                    Ok(n) => outgoing.truncate(start + n),
                                    Err(e) => return Err(invalid(e)),
                                }
                            }
                            Err(e) => return Err(invalid(e)),
                        }
                        taken = true;
                    }
                    stop = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.ended.set(true);
                    stop = true;
                }
                _ => stop = true,
            }
            incoming.drain(..discard);
            if stop {
                break;
            }
        }
        release_if_empty(&mut incoming);
        release_if_empty(&mut self.plaintext.borrow_mut());
        Ok(taken)
    }

    /// Sends what records wait, without waiting (nothing while a write is in flight).
    fn flush_now(&self) {
        if self.writing.get() {
            return;
        }
        let mut outgoing = self.outgoing.borrow_mut();
        while !outgoing.is_empty() {
            match sys::send_now(&self.stream, &outgoing) {
                Ok(n) if n > 0 => {
                    outgoing.drain(..n);
                }
                _ => break,
            }
        }
        release_if_empty(&mut outgoing);
    }

    /// Writes every record that waits, waiting for room.
    async fn write_pending(&self) -> std::io::Result<()> {
        loop {
            let out = std::mem::take(&mut *self.outgoing.borrow_mut());
            if out.is_empty() {
                return Ok(());
            }
            self.writing.set(true);
            let (result, _) = sys::write_all(&self.stream, out).await;
            self.writing.set(false);
            result?;
        }
    }

    /// Waits until plaintext can be read (some is decrypted already, or the socket is readable).
    pub(crate) async fn readable(&self) -> std::io::Result<()> {
        if self.buffered() || self.ended.get() {
            return Ok(());
        }
        sys::stream_ref(&self.stream).readable(false).await
    }

    /// Appends decrypted bytes to `buf`, up to its spare capacity (reading and decrypting what
    /// the socket holds when none is waiting): `Ok(0)` at the end of the stream, `WouldBlock`
    /// when nothing has arrived.
    pub(crate) fn recv_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        loop {
            {
                let mut plaintext = self.plaintext.borrow_mut();
                if !plaintext.is_empty() {
                    let room = (buf.capacity() - buf.len()).max(1);
                    let n = room.min(plaintext.len());
                    buf.extend_from_slice(&plaintext[..n]);
                    plaintext.drain(..n);
                    release_if_empty(&mut plaintext);
                    return Ok(n);
                }
            }
            if self.ended.get() {
                return Ok(0);
            }
            self.read_socket()?;
            let driven = self.drive(None);
            // A key update's answer, an alert: sent at once where the socket takes it.
            self.flush_now();
            driven?;
            if self.ended.get() && !self.buffered() {
                return Ok(0);
            }
        }
    }

    /// Whether decrypted bytes wait to be read.
    pub(crate) fn buffered(&self) -> bool {
        !self.plaintext.borrow().is_empty()
    }

    /// Encrypts `buf` and sends what the socket takes now: the plaintext bytes taken, or
    /// `WouldBlock` while earlier records still wait (see [`Tls::pending_out`]).
    pub(crate) fn send_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.flush_now();
        if self.writing.get() || !self.outgoing.borrow().is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        if !self.drive(Some(buf))? {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.flush_now();
        Ok(buf.len())
    }

    /// Whether records were made that the socket has not taken yet (a write must follow).
    pub(crate) fn pending_out(&self) -> bool {
        !self.outgoing.borrow().is_empty()
    }

    /// Encrypts all of `buf` and writes it, waiting for room; also what was pending.
    pub(crate) async fn write_all(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        if !buf.is_empty() {
            match self.drive(Some(&buf)) {
                Ok(true) => {}
                Ok(false) => return (Err(std::io::ErrorKind::NotConnected.into()), buf),
                Err(e) => return (Err(e), buf),
            }
        }
        match self.write_pending().await {
            Ok(()) => (Ok(buf.len()), buf),
            Err(e) => (Err(e), buf),
        }
    }

    /// Shuts the stream down; `Write` says close_notify first (best effort).
    pub(crate) fn shutdown(&self, how: Shutdown) {
        if matches!(how, Shutdown::Write) {
            self.close_notify();
            self.flush_now();
        }
        sys::shutdown(&self.stream, how);
    }

    /// Makes the close_notify alert (when the handshake is over).
    fn close_notify(&self) {
        let Ok(mut conn) = self.conn.try_borrow_mut() else {
            return;
        };
        let mut incoming = Vec::new();
        let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut incoming);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = state {
            let mut outgoing = self.outgoing.borrow_mut();
            let start = outgoing.len();
            outgoing.resize(start + 64, 0);
            match traffic.queue_close_notify(&mut outgoing[start..]) {
                Ok(n) => outgoing.truncate(start + n),
                Err(_) => outgoing.truncate(start),
            }
        }
    }

    /// The socket's descriptor.
    pub(crate) fn raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(sys::stream_ref(&self.stream))
    }
}
