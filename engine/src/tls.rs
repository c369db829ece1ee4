//! TLS on the shard (SPEC §1 `tls_cert_file`): the handshake, driven without blocking over the
//! connection's socket and bounded in time by the caller, and [`Tls`], the user-space transport:
//! rustls encrypts and decrypts around the same non-blocking socket calls plain TCP makes, so
//! HTTP, `/ws` and `/socket.io/` run over it unchanged (through `transport::Stream`).
//!
//! Records leave in order: while an io_uring write of ciphertext is in flight nothing else is
//! sent on the socket (what rustls produces meanwhile — a key-update answer, an alert — waits in
//! its buffer and goes with the next write). Plaintext rustls decrypted but the caller has not
//! read yet is reported by [`Tls::buffered`] (the socket's readiness does not show it).
//!
//! Must not: block the shard, hold a `RefCell` borrow across an await, or write a record while
//! another write is in flight.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

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

/// The connection's socket as rustls reads and writes it: non-blocking.
struct Socket<'a>(&'a UnsafeCell<TcpStream>);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        sys::recv_into(sys::stream_ref(self.0), buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sys::send_now(self.0, buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A TLS connection in user space.
pub(crate) struct Tls {
    stream: UnsafeCell<TcpStream>,
    conn: RefCell<ServerConnection>,
    /// Decrypted bytes not read yet.
    plaintext: Cell<usize>,
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
        let conn = ServerConnection::new(config).map_err(std::io::Error::other)?;
        let tls = Tls {
            stream: UnsafeCell::new(stream),
            conn: RefCell::new(conn),
            plaintext: Cell::new(0),
            ended: Cell::new(false),
            writing: Cell::new(false),
        };
        loop {
            tls.write_pending().await?;
            if !tls.conn.borrow().is_handshaking() {
                return Ok(tls);
            }
            sys::stream_ref(&tls.stream).readable(false).await?;
            match tls.read_records() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The alert that says why, if the socket takes it.
                    let _ = tls.write_pending().await;
                    return Err(e);
                }
            }
        }
    }

    /// Reads what ciphertext the socket holds and decrypts it: false at the end of the TCP
    /// stream, `WouldBlock` when nothing has arrived, `InvalidData` for what is not TLS.
    fn read_records(&self) -> std::io::Result<bool> {
        let mut conn = self.conn.borrow_mut();
        let n = conn.read_tls(&mut Socket(&self.stream))?;
        let state = conn
            .process_new_packets()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.plaintext.set(state.plaintext_bytes_to_read());
        if n == 0 || state.peer_has_closed() {
            self.ended.set(true);
        }
        Ok(n > 0)
    }

    /// Sends what rustls has ready now, without waiting (nothing while a write is in flight).
    fn flush_now(&self, conn: &mut ServerConnection) {
        if self.writing.get() {
            return;
        }
        while conn.wants_write() {
            match conn.write_tls(&mut Socket(&self.stream)) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// Writes everything rustls has ready, waiting for room.
    async fn write_pending(&self) -> std::io::Result<()> {
        loop {
            let mut out = Vec::new();
            {
                let mut conn = self.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
            }
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
        if self.plaintext.get() > 0 || self.ended.get() {
            return Ok(());
        }
        sys::stream_ref(&self.stream).readable(false).await
    }

    /// Appends decrypted bytes to `buf`, up to its spare capacity (reading and decrypting what
    /// the socket holds when none is waiting): `Ok(0)` at the end of the stream, `WouldBlock`
    /// when nothing has arrived.
    pub(crate) fn recv_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        loop {
            if self.plaintext.get() > 0 {
                let start = buf.len();
                buf.resize(buf.capacity().max(start + 1), 0);
                let read = self.conn.borrow_mut().reader().read(&mut buf[start..]);
                let n = match read {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(e) => {
                        buf.truncate(start);
                        return Err(e);
                    }
                };
                buf.truncate(start + n);
                self.plaintext.set(self.plaintext.get().saturating_sub(n));
                if n > 0 {
                    return Ok(n);
                }
                self.plaintext.set(0);
            }
            if self.ended.get() {
                return Ok(0);
            }
            let more = match self.read_records() {
                Ok(more) => more,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    let mut conn = self.conn.borrow_mut();
                    self.flush_now(&mut conn);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            // A key update, a ticket: answered at once where the socket takes it.
            let mut conn = self.conn.borrow_mut();
            self.flush_now(&mut conn);
            drop(conn);
            if !more && self.plaintext.get() == 0 {
                return Ok(0);
            }
        }
    }

    /// Whether decrypted bytes wait to be read.
    pub(crate) fn buffered(&self) -> bool {
        self.plaintext.get() > 0
    }

    /// Encrypts `buf` and sends what the socket takes now: the plaintext bytes taken, or
    /// `WouldBlock` while earlier records still wait (see [`Tls::pending_out`]).
    pub(crate) fn send_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut conn = self.conn.borrow_mut();
        self.flush_now(&mut conn);
        if conn.wants_write() || self.writing.get() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = conn.writer().write(buf)?;
        self.flush_now(&mut conn);
        Ok(n)
    }

    /// Whether records were made that the socket has not taken yet (a write must follow).
    pub(crate) fn pending_out(&self) -> bool {
        self.conn.borrow().wants_write()
    }

    /// Encrypts all of `buf` and writes it, waiting for room; also what was pending.
    pub(crate) async fn write_all(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        let mut taken = 0;
        loop {
            if taken < buf.len() {
                let wrote = self.conn.borrow_mut().writer().write(&buf[taken..]);
                match wrote {
                    Ok(n) => taken += n,
                    Err(e) => return (Err(e), buf),
                }
            }
            if let Err(e) = self.write_pending().await {
                return (Err(e), buf);
            }
            if taken >= buf.len() {
                return (Ok(buf.len()), buf);
            }
        }
    }

    /// Shuts the stream down; `Write` says close_notify first (best effort).
    pub(crate) fn shutdown(&self, how: Shutdown) {
        if matches!(how, Shutdown::Write) {
            let mut conn = self.conn.borrow_mut();
            conn.send_close_notify();
            self.flush_now(&mut conn);
        }
        sys::shutdown(&self.stream, how);
    }

    /// The socket's descriptor.
    pub(crate) fn raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(sys::stream_ref(&self.stream))
    }
}
