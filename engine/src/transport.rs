//! How the engine reads and writes a connection's bytes, from the accept to the close, for HTTP,
//! WebSocket and Socket.IO alike: the [`Transport`] operations (readiness, a non-blocking read into
//! a borrowed buffer, a non-blocking send, an io_uring write of what the kernel did not take, a
//! shutdown), and [`Stream`], the transports a connection can have. Plain TCP today; TLS comes
//! as a second variant (with kernel TLS the calls stay the same on the socket; with rustls in user
//! space they encrypt and decrypt around it). The `unsafe` underneath stays in `sys`.

use std::cell::UnsafeCell;
use std::os::fd::RawFd;
use std::rc::Rc;

use monoio::net::TcpStream;

use crate::sys::{self, Shutdown};

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
}

/// Plain TCP: one handle on the socket, shared by the shard's reader and the writer (see
/// [`sys::stream_ref`]).
#[derive(Clone)]
pub(crate) struct Tcp(Rc<UnsafeCell<TcpStream>>);

impl Transport for Tcp {
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

/// A connection's transport. An enum, not a trait object: the calls on the hot path are
/// dispatched statically, and an idle connection carries one pointer.
#[derive(Clone)]
pub(crate) enum Stream {
    /// Plain TCP.
    Tcp(Tcp),
}

impl Stream {
    /// A plain TCP connection (Nagle off: frames leave as they are flushed).
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Self::Tcp(Tcp(Rc::new(UnsafeCell::new(stream))))
    }
}

impl Transport for Stream {
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            Self::Tcp(t) => t.readable().await,
        }
    }

    fn recv_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Self::Tcp(t) => t.recv_now(buf),
        }
    }

    fn send_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(t) => t.send_now(buf),
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        match self {
            Self::Tcp(t) => t.write_all(buf).await,
        }
    }

    fn shutdown(&self, how: Shutdown) {
        match self {
            Self::Tcp(t) => t.shutdown(how),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(t) => t.raw_fd(),
        }
    }
}
