//! How the engine reads and writes a connection's bytes, from the accept to the close, for HTTP,
//! WebSocket and Socket.IO alike: the [`Transport`] operations (readiness, a non-blocking read into
//! a borrowed buffer, a non-blocking send, an io_uring write of what the kernel did not take, a
//! shutdown), and [`Stream`], the transports a connection can have: plain TCP, or TLS with rustls
//! in user space (`tls`), which encrypts and decrypts around the same socket calls. The `unsafe`
//! underneath stays in `sys`.

use std::cell::UnsafeCell;
use std::os::fd::RawFd;
use std::rc::Rc;

use monoio::net::TcpStream;

use crate::sys::{self, Shutdown};
use crate::tls::Tls;

/// What the engine does with a connection's bytes.
#[allow(async_fn_in_trait)]
pub(crate) trait Transport {
    /// Waits until bytes (or the end of the stream) can be read.
    async fn readable(&self) -> std::io::Result<()>;
    /// Appends what can be read now to `buf`, up to its spare capacity: `Ok(0)` at the end of
    /// the stream, `WouldBlock` when nothing has arrived.
    fn recv_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize>;
    /// Sends what it can of `buf` now, without waiting: the bytes taken, or `WouldBlock`.
    fn send_now(&self, buf: &[u8]) -> std::io::Result<usize>;
    /// Writes all of `buf`, waiting for room (the caller is the connection's only writer).
    async fn write_all(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>);
    /// Shuts the stream down (`Write`: after what is queued; `Both`: at once).
    fn shutdown(&self, how: Shutdown);
    /// The socket's descriptor, for the shard's readiness set.
    fn raw_fd(&self) -> RawFd;
    /// Whether bytes wait to be read that the socket's readiness does not show (decrypted
    /// already): the reader reads again without waiting.
    fn buffered(&self) -> bool {
        false
    }
    /// Whether bytes were taken that the socket has not (records made, not sent): a
    /// `write_all` of nothing sends them.
    fn pending_out(&self) -> bool {
        false
    }
}

/// Plain TCP: the socket, shared by the shard's reader and the writer through the connection's
/// [`Stream`] (see [`sys::stream_ref`]).
pub(crate) struct Tcp(UnsafeCell<TcpStream>);

impl Tcp {
    async fn readable(&self) -> std::io::Result<()> {
        sys::stream_ref(&self.0).readable(false).await
    }

    fn recv_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        sys::recv_now(sys::stream_ref(&self.0), buf)
    }

    fn send_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        sys::send_now(&self.0, buf)
    }

    async fn write_all(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        sys::write_all(&self.0, buf).await
    }

    fn shutdown(&self, how: Shutdown) {
        sys::shutdown(&self.0, how);
    }

    fn raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(sys::stream_ref(&self.0))
    }
}

/// The transports a connection can have.
enum Kind {
    /// Plain TCP.
    Tcp(Tcp),
    /// TLS in user space (boxed: a plain connection's allocation stays the size of its socket).
    Tls(Box<Tls>),
}

/// A connection's transport: one pointer (an idle connection's state is counted in bytes), the
/// transport behind it chosen by an enum, so the calls on the hot path are dispatched statically.
#[derive(Clone)]
pub(crate) struct Stream(Rc<Kind>);

impl Stream {
    /// A plain TCP connection (Nagle off: frames leave as they are flushed).
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Self(Rc::new(Kind::Tcp(Tcp(UnsafeCell::new(stream)))))
    }

    /// A connection whose TLS handshake finished.
    pub(crate) fn tls(tls: Tls) -> Self {
        Self(Rc::new(Kind::Tls(Box::new(tls))))
    }
}

impl Transport for Stream {
    async fn readable(&self) -> std::io::Result<()> {
        match &*self.0 {
            Kind::Tcp(t) => t.readable().await,
            Kind::Tls(t) => t.readable().await,
        }
    }

    fn recv_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match &*self.0 {
            Kind::Tcp(t) => t.recv_now(buf),
            Kind::Tls(t) => t.recv_now(buf),
        }
    }

    fn send_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        match &*self.0 {
            Kind::Tcp(t) => t.send_now(buf),
            Kind::Tls(t) => t.send_now(buf),
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        match &*self.0 {
            Kind::Tcp(t) => t.write_all(buf).await,
            Kind::Tls(t) => t.write_all(buf).await,
        }
    }

    fn shutdown(&self, how: Shutdown) {
        match &*self.0 {
            Kind::Tcp(t) => t.shutdown(how),
            Kind::Tls(t) => t.shutdown(how),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match &*self.0 {
            Kind::Tcp(t) => t.raw_fd(),
            Kind::Tls(t) => t.raw_fd(),
        }
    }

    fn buffered(&self) -> bool {
        match &*self.0 {
            Kind::Tcp(_) => false,
            Kind::Tls(t) => t.buffered(),
        }
    }

    fn pending_out(&self) -> bool {
        match &*self.0 {
            Kind::Tcp(_) => false,
            Kind::Tls(t) => t.pending_out(),
        }
    }
}
