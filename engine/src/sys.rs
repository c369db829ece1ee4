//! The engine's only `unsafe`: socket shutdown by descriptor, readiness and writes on a stream
//! shared by a connection's reader and writer, the non-blocking read into a shard's scratch
//! buffer, a shard's epoll set of readable connections, and the thread priority of blocking
//! pools.
//! Each function states why it is sound.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::os::fd::RawFd;

use monoio::net::TcpStream;

/// How much of a socket to shut down.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shutdown {
    /// Send FIN after what is queued (the peer sees end of stream).
    Write,
    /// Both directions: wakes a pending read or write on this socket with an error or EOF.
    Both,
}

/// Shuts down the socket `fd`.
///
/// The caller must keep the descriptor open for the duration of the call: the engine holds the
/// stream's `Rc` in its connection state (`Conn::stream`) for the connection's whole life, so the
/// number cannot have been closed and reused by another socket (the borrow here is of that
/// state).
pub(crate) fn shutdown(stream: &UnsafeCell<TcpStream>, how: Shutdown) {
    let how = match how {
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    let fd: RawFd = std::os::fd::AsRawFd::as_raw_fd(stream_ref(stream));
    // SAFETY: `shutdown(2)` takes a plain descriptor and touches no memory of ours; the stream
    // borrowed here keeps the descriptor open, so it still names this connection's socket. Errors
    // (e.g. ENOTCONN after the peer left) are expected and ignored.
    let _ = unsafe { libc::shutdown(fd, how) };
}

/// Appends what the socket holds right now to `buf`, up to its spare capacity, with a
/// non-blocking `recv`: `Ok(0)` is the end of the stream, `WouldBlock` means nothing yet. Called
/// after readiness, so that no buffer is lent to the kernel while a connection waits: with one
/// io_uring read per connection in flight, 15,000 connections turning readable at once (a mass
/// disconnect) held 15,000 buffers of 16 KiB (240 MB) until their reads completed.
pub(crate) fn recv_now(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let fd: RawFd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let spare = buf.spare_capacity_mut();
    // SAFETY: `recv(2)` writes at most `spare.len()` bytes at the pointer, which is `buf`'s own
    // spare capacity, valid and exclusively borrowed for the call. The stream borrowed here keeps
    // the descriptor open. MSG_DONTWAIT makes the call non-blocking whatever the socket's mode.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    let Ok(n) = usize::try_from(n) else {
        return Err(std::io::Error::last_os_error());
    };
    let len = buf.len() + n;
    // SAFETY: `recv` initialised the first `n` bytes of the spare capacity (n <= its length).
    unsafe { buf.set_len(len) };
    Ok(n)
}

/// The stream behind a split connection, for readiness and descriptor-level calls only.
pub(crate) fn stream_ref(stream: &UnsafeCell<TcpStream>) -> &TcpStream {
    // SAFETY: this is the aliasing monoio's own split halves rely on: a read half and a write half
    // each reach the one `TcpStream` through this `UnsafeCell` and run their operations
    // concurrently on one thread. The methods we call through this shared reference (`readable`,
    // `as_raw_fd`) only clone or read the stream's descriptor handle; they never observe state that
    // the write half mutates, and the shard is a single thread, so no data race exists.
    unsafe { &*stream.get() }
}

/// Sends what it can of `buf` on a connection's stream now, without waiting (`MSG_DONTWAIT`):
/// the bytes taken by the kernel, `WouldBlock` when its buffer is full.
pub(crate) fn send_now(stream: &UnsafeCell<TcpStream>, buf: &[u8]) -> std::io::Result<usize> {
    let fd: RawFd = std::os::fd::AsRawFd::as_raw_fd(stream_ref(stream));
    // SAFETY: `send(2)` reads at most `buf.len()` bytes from `buf`, valid for the call; the borrowed
    // stream keeps the descriptor open. MSG_NOSIGNAL: a closed peer is an error, not a SIGPIPE.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Writes all of `buf` to a connection's stream (one io_uring write, more if the kernel takes
/// part of it). The caller must be the connection's only writer (`Conn::writing`).
pub(crate) async fn write_all(
    stream: &UnsafeCell<TcpStream>,
    buf: Vec<u8>,
) -> (std::io::Result<usize>, Vec<u8>) {
    use monoio::io::AsyncWriteRentExt;
    // SAFETY: the aliasing monoio's own split halves rely on (`OwnedWriteHalf::write` does exactly
    // this): the shard's reader reaches the same `TcpStream` through `stream_ref` only for its
    // descriptor, which this write does not change; the caller is the one writer; the shard is a
    // single thread, so no data race exists.
    let stream = unsafe { &mut *stream.get() };
    stream.write_all(buf).await
}

/// A shard's set of WebSocket connections waiting to be readable: one epoll instance, awaited as
/// a whole through the runtime (one io_uring poll on it, or a registration with the epoll driver),
/// so that an idle connection has no task and no operation in flight, only its entry in the
/// kernel's set. Level-triggered: a connection with bytes left unread is reported again.
pub(crate) struct ReadySet {
    /// Owned by `watcher`, which closes it.
    epfd: RawFd,
    watcher: monoio::net::UnixStream,
    events: std::cell::RefCell<Vec<libc::epoll_event>>,
}

/// Connections reported by one look at a [`ReadySet`].
const READY_BATCH: usize = 256;

impl ReadySet {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: `epoll_create1` takes a flag and returns a new descriptor, or -1.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `epfd` was just created and nothing else owns it; the `UnixStream` takes
        // ownership (closing it on drop). It is only ever polled for readability (the runtime's
        // `readable`), never used as a socket, and an epoll descriptor is pollable.
        let owned = unsafe {
            <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(epfd)
        };
        let watcher = monoio::net::UnixStream::from_std(owned)?;
        Ok(Self {
            epfd,
            watcher,
            events: std::cell::RefCell::new(Vec::with_capacity(READY_BATCH)),
        })
    }

    /// Waits until some connection in the set is readable (or has hung up).
    pub(crate) async fn wait(&self) -> std::io::Result<()> {
        self.watcher.readable(false).await
    }

    /// Adds a connection's socket `fd` under `token` (its owner keeps it open while it is in).
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `epoll_ctl` reads the event struct we pass for the duration of the call; both
        // descriptors are open (the set's own, and the connection's, kept by its `Conn`).
        let rc = unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &raw mut event) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes a connection's stream (before its socket is shut, so that a level-triggered end of
    /// stream is not reported over and over).
    pub(crate) fn remove(&self, fd: RawFd) {
        // SAFETY: as in `add`; the event argument may be null for EPOLL_CTL_DEL (Linux 2.6.9+).
        // An error (the stream was never added) changes nothing.
        let _ =
            unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// The tokens of connections readable now (at most [`READY_BATCH`]; none when nothing is),
    /// without waiting.
    pub(crate) fn ready(&self, tokens: &mut Vec<u64>) {
        tokens.clear();
        let mut events = self.events.borrow_mut();
        events.clear();
        // SAFETY: the kernel writes at most `capacity` events into the vector's buffer, which is
        // valid and exclusively borrowed for the call; a timeout of 0 never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd,
                events.as_mut_ptr(),
                i32::try_from(events.capacity()).unwrap_or(i32::MAX),
                0,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return;
        };
        // SAFETY: `epoll_wait` initialised the first `n` events (n <= capacity).
        unsafe { events.set_len(n) };
        tokens.extend(events.iter().map(|e| e.u64));
    }

    /// Whether the last look filled a whole batch (more may be waiting).
    pub(crate) fn batch_full(tokens: &[u64]) -> bool {
        tokens.len() >= READY_BATCH
    }
}

/// Stops the kernel from backing this process's memory with transparent huge pages (existing
/// mappings included, from their next fault on). With THP set to `always`, the allocator's arenas
/// were faulted in 2 MiB at a time: measured with `loadgen idle --conns 15000`, idle connections
/// cost 4.5–4.7 KB of RSS each with THP and 2.7 KB without, the empty server 19 MB against 13.5 MB;
/// fan-out showed no measurable difference.
/// Failure (an old kernel) is logged.
pub fn disable_transparent_huge_pages() {
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` takes plain integers and sets a flag on the
    // calling process's memory descriptor; no memory of ours is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot disable transparent huge pages"
        );
    }
}

/// Lowers the calling thread's CPU priority to the least favourable nice value, so that work
/// such as password hashing yields to the shards. Failure (a sandbox refusing it) is logged.
pub fn lower_thread_priority() {
    // SAFETY: `setpriority` takes plain integers; `who = 0` with PRIO_PROCESS names the calling
    // thread on Linux (threads have their own nice value). No memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the hashing threads' priority"
        );
    }
}
