//! The one write path of a shard's WebSocket connections, with one policy: a connection's bounded
//! outbound queue ([`Outbound`]), the shard's flush list and deferred queue, the write delays
//! (`write_delay`, and `busy_write_delay` grown from the shard's measured load), the slow-consumer
//! bound (`max_queued_bytes`, 4011) and the close handshake's last frames.
//!
//! A frame is copied once into the connection's queue and the connection is listed for the
//! shard's flush, which runs once the task that queued frames yields: everything queued for a
//! connection in that time goes out in one non-blocking `send`, and only what the kernel does not
//! take waits in an io_uring write. Hand-written because it is the hot path: no lock, no
//! allocation per frame beyond the queue's growth, no syscall per frame. It knows a connection
//! only through [`Outlet`]; it must not decode input or know rooms.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Waker;
use std::time::Duration;

use protocol::CloseCode;
use protocol::ws;

use crate::buffers::BufferPool;
use crate::clock::{monotonic_us, monotonic_us32};
use crate::config::EngineConfig;
use crate::metrics::Metrics;
use crate::sys::Shutdown;
use crate::transport::{Stream, Transport};

/// First capacity of a connection's outbound buffer (it grows by doubling while frames wait).
const FIRST_OUT_CAPACITY: usize = 512;

/// Queues larger than this go to an io_uring write at once rather than a direct `send`
/// (measured: with 4 KiB zstd messages, direct sends of large queues cut fan-out by a third).
const DIRECT_SEND_MAX: usize = 16 * 1024;

/// Where a connection's queued frames stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    /// Nothing being written.
    Idle,
    /// Listed for the shard's next flush (a direct non-blocking send), or waiting in the shard's
    /// deferred queue for the write delay to pass.
    Listed,
    /// An io_uring write is in flight (what the kernel did not take at once).
    Writing,
}

/// A connection's outbound side. Empty with no capacity while idle: an idle connection holds no
/// buffer.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Frames encoded and waiting, in order: a delivery is copied here once (no refcount per
    /// member), and a flush writes the whole buffer.
    out: RefCell<Vec<u8>>,
    writing: Cell<WriteState>,
    /// When the last write started: [`monotonic_us32`] (only differences are read), for the
    /// write delay.
    last_write_us: Cell<u32>,
    /// The close code sent, once a close has been decided; 0 until then (no close code is 0).
    /// Two bytes, not an `Option<CloseCode>`'s four: every idle connection carries this struct
    /// (see `Conn`'s size test).
    closing: Cell<u16>,
    /// The first frame (welcome / Socket.IO CONNECT) has been queued: writes may start.
    ready: Cell<bool>,
}

impl Default for Outbound {
    fn default() -> Self {
        Self {
            out: RefCell::new(Vec::new()),
            writing: Cell::new(WriteState::Idle),
            // Long enough ago that the first write is not delayed.
            last_write_us: Cell::new(monotonic_us32().wrapping_sub(1 << 31)),
            closing: Cell::new(0),
            ready: Cell::new(false),
        }
    }
}

impl Outbound {
    /// Bytes queued and not yet handed to the kernel.
    pub(crate) fn backlog(&self) -> usize {
        self.out.borrow().len()
    }

    /// The close code, once a close has been decided.
    pub(crate) fn closing(&self) -> Option<CloseCode> {
        match self.closing.get() {
            0 => None,
            code => Some(CloseCode(code)),
        }
    }

    /// Whether the first frame has been queued (see [`Writer::set_ready`]).
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.get()
    }
}

/// What the writer needs of a connection.
pub(crate) trait Outlet {
    /// Its outbound side.
    fn outbound(&self) -> &Outbound;
    /// Its transport, shared with the shard's reader.
    fn socket(&self) -> &Stream;
    /// Whether it speaks Socket.IO (an Engine.IO close packet precedes the close frame).
    fn speaks_socketio(&self) -> bool;
    /// A write failed: the peer is gone without a close handshake.
    fn write_failed(&self);
}

/// The write delay that a shard's load calls for next (see [`Writer::probe_load`]), after a probe
/// that found its thread wanting the CPU `permille` of the time (smoothed), `elapsed_us` after the
/// last probe.
fn next_busy_delay(current: u32, permille: u64, elapsed_us: u64, max: u32) -> u32 {
    if elapsed_us > 10 * LOAD_PROBE_US {
        // The shard stopped flushing for a while: whatever load there was has passed.
        0
    } else if permille >= 900 {
        current.saturating_mul(2).clamp(1000.min(max), max)
    } else if permille < 500 {
        if current / 2 < 500 { 0 } else { current / 2 }
    } else {
        current
    }
}

/// How often a flushing shard looks at its load ([`Writer::probe_load`]), in µs.
const LOAD_PROBE_US: u64 = 20_000;

/// The shard thread's CPU demand so far, from `/proc/thread-self/schedstat` (opened on the shard's
/// thread at the first probe; a kernel without it leaves the busy write delay at zero).
#[derive(Default)]
struct LoadProbe {
    file: Option<std::fs::File>,
    unavailable: bool,
    at_us: u64,
    demand_ns: u64,
    /// The demand's moving average, in thousandths of wall time.
    demand_permille: u64,
}

impl LoadProbe {
    /// Nanoseconds this thread has run plus waited to run.
    fn read_demand_ns(&mut self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        if self.unavailable {
            return None;
        }
        if self.file.is_none() {
            self.file = std::fs::File::open("/proc/thread-self/schedstat").ok();
        }
        let mut buf = [0u8; 96];
        let parsed = self.file.as_ref().and_then(|f| {
            let n = f.read_at(&mut buf, 0).ok()?;
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            let mut fields = text.split_ascii_whitespace().map(|v| v.parse::<u64>().ok());
            let (run, wait) = (fields.next()??, fields.next()??);
            Some(run.saturating_add(wait))
        });
        if parsed.is_none() {
            self.unavailable = true;
        }
        parsed
    }
}

/// A shard's write path: the connections listed for the next flush, those held for the write
/// delay, and the delay the shard's load calls for.
pub(crate) struct Writer<C> {
    shard: usize,
    max_queued_bytes: usize,
    write_delay_us: u32,
    busy_write_delay_us: u32,
    metrics: Arc<Metrics>,
    buffers: Rc<BufferPool>,
    /// Connections with frames queued since the last flush, for [`flusher`].
    to_flush: RefCell<Vec<Rc<C>>>,
    flusher_waker: RefCell<Option<Waker>>,
    /// Connections whose flush waits for the write delay, with when it is due
    /// ([`monotonic_us`]); sent by [`deferred_flusher`].
    deferred: RefCell<VecDeque<(u64, Rc<C>)>>,
    deferred_waker: RefCell<Option<Waker>>,
    /// The write delay that this shard's load calls for now (see [`Self::probe_load`]), in µs.
    busy_delay_us: Cell<u32>,
    load: RefCell<LoadProbe>,
}

impl<C: Outlet + 'static> Writer<C> {
    /// The write path of shard `shard`.
    pub(crate) fn new(
        shard: usize,
        config: &EngineConfig,
        metrics: Arc<Metrics>,
        buffers: Rc<BufferPool>,
    ) -> Self {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let writer = Self {
            shard,
            max_queued_bytes: config.max_queued_bytes,
            write_delay_us: us(config.write_delay),
            busy_write_delay_us: us(config.busy_write_delay),
            metrics,
            buffers,
            to_flush: RefCell::new(Vec::new()),
            flusher_waker: RefCell::new(None),
            deferred: RefCell::new(VecDeque::new()),
            deferred_waker: RefCell::new(None),
            busy_delay_us: Cell::new(0),
            load: RefCell::new(LoadProbe::default()),
        };
        writer.metrics.write_delay(shard, writer.write_delay_us());
        writer
    }

    /// The most a connection's queue holds back for the write delay: past it, frames go out at
    /// the next flush (so the delay never brings a connection near its `max_queued_bytes`).
    fn hold_limit(&self) -> usize {
        DIRECT_SEND_MAX.min(self.max_queued_bytes / 4)
    }

    /// How long a connection written to less than this ago waits before its next write, in µs:
    /// `write_delay`, or more while the shard is saturated (up to `busy_write_delay`).
    pub(crate) fn write_delay_us(&self) -> u32 {
        self.write_delay_us.max(self.busy_delay_us.get())
    }

    /// Queues a frame; starts the writer when the connection is ready. Past `max_queued_bytes`
    /// the connection is a slow consumer and is closed with 4011.
    pub(crate) fn enqueue(self: &Rc<Self>, conn: &Rc<C>, frame: &[u8]) {
        let outbound = conn.outbound();
        if outbound.closing().is_some() {
            return;
        }
        let max = self.max_queued_bytes;
        if outbound.out.borrow().len() + frame.len() > max
            && outbound.writing.get() == WriteState::Listed
        {
            // Over the bound before the flush came round (a burst handled in one go, or a queue
            // held for the write delay): the kernel may take what waits, so it is offered first,
            // and only what it does not take counts against the bound.
            self.send_queued(conn);
        }
        {
            let mut out = outbound.out.borrow_mut();
            if out.len() + frame.len() > max {
                drop(out);
                self.close(conn, CloseCode::SLOW_CONSUMER);
                return;
            }
            if out.capacity() == 0 {
                // Sized to the need, not a pooled 16 KiB: a broadcast to every connection of a
                // shard must not pin a scratch buffer per connection.
                out.reserve(frame.len().max(FIRST_OUT_CAPACITY));
            }
            let limit = self.hold_limit();
            let below = out.len() < limit;
            out.extend_from_slice(frame);
            if below && out.len() >= limit && outbound.writing.get() == WriteState::Listed {
                // Held for the write delay and now large: listed again, the next flush sends it
                // (a second listing of a connection already due is harmless).
                drop(out);
                self.list_for_flush(conn.clone());
                return;
            }
        }
        self.kick(conn);
    }

    /// Queues a frame ahead of everything else (the welcome).
    pub(crate) fn enqueue_first(&self, conn: &Rc<C>, frame: &[u8]) {
        conn.outbound()
            .out
            .borrow_mut()
            .splice(0..0, frame.iter().copied());
        self.kick(conn);
    }

    /// Marks the connection ready (first frame queued) and starts writing.
    pub(crate) fn set_ready(&self, conn: &Rc<C>) {
        conn.outbound().ready.set(true);
        self.kick(conn);
    }

    fn kick(&self, conn: &Rc<C>) {
        let outbound = conn.outbound();
        if outbound.ready.get()
            && outbound.writing.get() == WriteState::Idle
            && !outbound.out.borrow().is_empty()
        {
            outbound.writing.set(WriteState::Listed);
            self.list_for_flush(conn.clone());
        }
    }

    /// Starts the close handshake with `code`: queued frames are dropped for a slow consumer and
    /// kept otherwise, the close frame goes last, then the socket's write side is shut. A peer
    /// that does not finish the handshake within 2 s (30 s for a slow consumer) is cut off.
    pub(crate) fn close(&self, conn: &Rc<C>, code: CloseCode) {
        let outbound = conn.outbound();
        if outbound.closing().is_some() {
            return;
        }
        outbound.closing.set(code.0.max(1));
        {
            let mut out = outbound.out.borrow_mut();
            if code == CloseCode::SLOW_CONSUMER {
                // What waits is dropped; the buffer goes with it.
                *out = Vec::new();
            }
            if conn.speaks_socketio() && code != CloseCode::SLOW_CONSUMER {
                // Engine.IO close packet first, so that Socket.IO clients see a server disconnect.
                ws::encode_frame(&mut out, ws::frame::TEXT, b"1");
            }
            ws::encode_close(&mut out, code);
        }
        outbound.ready.set(true);
        self.kick(conn);
        // A slow consumer gets longer to drain what its kernel buffers hold and read the 4011: its
        // queue is already dropped, so waiting costs no memory of ours.
        let grace = if code == CloseCode::SLOW_CONSUMER {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        };
        let conn = conn.clone();
        monoio::spawn(async move {
            monoio::time::sleep(grace).await;
            conn.socket().shutdown(Shutdown::Both);
        });
    }

    /// Lists a connection for the next flush (see [`flusher`]).
    fn list_for_flush(&self, conn: Rc<C>) {
        let mut list = self.to_flush.borrow_mut();
        list.push(conn);
        if list.len() == 1
            && let Some(waker) = self.flusher_waker.borrow_mut().take()
        {
            waker.wake();
        }
    }

    /// Holds a listed connection's flush for `wait_us` (see [`deferred_flusher`]).
    fn defer_flush(&self, conn: Rc<C>, wait_us: u64) {
        self.metrics
            .deferred_flushes
            .fetch_add(1, Ordering::Relaxed);
        let mut deferred = self.deferred.borrow_mut();
        deferred.push_back((monotonic_us() + wait_us, conn));
        if deferred.len() == 1
            && let Some(waker) = self.deferred_waker.borrow_mut().take()
        {
            waker.wake();
        }
    }

    /// The flush of one listed connection: sends the whole queue with one non-blocking `send`;
    /// what the kernel does not take goes to an io_uring write that waits for room.
    fn flush_now(self: &Rc<Self>, conn: &Rc<C>) {
        let outbound = conn.outbound();
        if outbound.writing.get() != WriteState::Listed {
            return;
        }
        let delay = self.write_delay_us();
        if delay > 0 && outbound.closing().is_none() {
            // Written less than the delay ago: what is queued waits for the rest of it, unless
            // the queue is already large (so the delay never brings a connection near its bound).
            let since = monotonic_us32().wrapping_sub(outbound.last_write_us.get());
            if since < delay && outbound.out.borrow().len() < self.hold_limit() {
                self.defer_flush(conn.clone(), u64::from(delay - since));
                return;
            }
        }
        self.send_queued(conn);
    }

    /// Sends what is queued now (see [`Self::flush_now`]).
    fn send_queued(self: &Rc<Self>, conn: &Rc<C>) {
        let outbound = conn.outbound();
        if outbound.writing.get() != WriteState::Listed {
            return;
        }
        outbound.last_write_us.set(monotonic_us32());
        let sent = {
            let out = outbound.out.borrow();
            if out.is_empty() {
                Ok(0)
            } else if out.len() > DIRECT_SEND_MAX {
                Err(std::io::ErrorKind::WouldBlock.into())
            } else {
                conn.socket().send_now(&out)
            }
        };
        match sent {
            Ok(n) => {
                if n > 0 {
                    self.metrics
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.metrics.socket_writes.fetch_add(1, Ordering::Relaxed);
                }
                let mut out = outbound.out.borrow_mut();
                if n >= out.len() && !conn.socket().pending_out() {
                    // Written: the buffer goes (an idle connection keeps none).
                    *out = Vec::new();
                    drop(out);
                    outbound.writing.set(WriteState::Idle);
                    if outbound.closing().is_some() {
                        conn.socket().shutdown(Shutdown::Write);
                    }
                    return;
                }
                let n = n.min(out.len());
                out.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                *outbound.out.borrow_mut() = Vec::new();
                outbound.writing.set(WriteState::Idle);
                conn.write_failed();
                return;
            }
        }
        outbound.writing.set(WriteState::Writing);
        monoio::spawn(write_loop(self.clone(), conn.clone()));
    }

    /// Sets the write delay that the shard's load calls for, at most every [`LOAD_PROBE_US`]:
    /// from the share of wall time that this shard's thread spent running or waiting to run
    /// (`/proc/thread-self/schedstat`). A thread that wants the CPU nearly all the time (≥ 90 %)
    /// is saturated: the delay doubles (from 1 ms, up to `busy_write_delay`), so that frames to a
    /// busy connection leave in fewer, larger writes, which costs the kernel and the clients
    /// less per message. Under 50 % it halves back towards zero, and a pause in flushing resets
    /// it. The demand is smoothed over about four probes. Measured on 2 cores shared with the load
    /// generator: 90–99 % near saturation without the delay, 72–78 % at saturation with it (a
    /// floor of 70 % made the delay flap and lost ~15 % of the peak), ~60 % at a third of the
    /// peak (where the delay stays off).
    /// Costs one `pread` of a procfs file per probe, made only while the shard flushes.
    fn probe_load(&self) {
        let max = self.busy_write_delay_us;
        if max == 0 {
            return;
        }
        let now = monotonic_us();
        let mut probe = self.load.borrow_mut();
        let elapsed = now.saturating_sub(probe.at_us);
        if elapsed < LOAD_PROBE_US {
            return;
        }
        let Some(demand_ns) = probe.read_demand_ns() else {
            return;
        };
        let used_ns = demand_ns.saturating_sub(probe.demand_ns);
        let first = probe.at_us == 0;
        (probe.at_us, probe.demand_ns) = (now, demand_ns);
        if first {
            return;
        }
        let permille = used_ns.saturating_mul(1000) / elapsed.saturating_mul(1000).max(1);
        // Smoothed over about four probes (~80 ms): one 20 ms sample is too noisy to act on.
        probe.demand_permille = if elapsed > 10 * LOAD_PROBE_US {
            permille
        } else {
            probe.demand_permille - probe.demand_permille / 4 + permille / 4
        };
        let current = self.busy_delay_us.get();
        let next = next_busy_delay(current, probe.demand_permille, elapsed, max);
        if next != current {
            self.busy_delay_us.set(next);
            self.metrics.write_delay(self.shard, self.write_delay_us());
        }
    }
}

/// Writes, as an io_uring write, what the kernel did not take at once, and what is queued
/// meanwhile, until the queue is empty.
async fn write_loop<C: Outlet + 'static>(writer: Rc<Writer<C>>, conn: Rc<C>) {
    let outbound = conn.outbound();
    let mut failed = false;
    loop {
        // Everything queued goes out in one write; frames queued meanwhile start a new buffer.
        let buf = std::mem::take(&mut *outbound.out.borrow_mut());
        // Empty, but records the transport made still wait: writing nothing sends them.
        if buf.is_empty() && !conn.socket().pending_out() {
            break;
        }
        let len = buf.len() as u64;
        let (result, written) = conn.socket().write_all(buf).await;
        writer.buffers.put(written);
        if result.is_err() {
            failed = true;
            *outbound.out.borrow_mut() = Vec::new();
            break;
        }
        writer.metrics.bytes_out.fetch_add(len, Ordering::Relaxed);
        writer.metrics.socket_writes.fetch_add(1, Ordering::Relaxed);
    }
    outbound.writing.set(WriteState::Idle);
    if failed {
        conn.write_failed();
    } else if outbound.closing().is_some() {
        conn.socket().shutdown(Shutdown::Write);
    }
}

/// Writes what every listed connection has queued, once the task that queued it (the mailbox,
/// the reader, a handshake) yields: everything queued for a connection in that time goes out in
/// one non-blocking `send`, with no task and no io_uring round trip unless the kernel's buffer is
/// full.
pub(crate) async fn flusher<C: Outlet + 'static>(writer: Rc<Writer<C>>) {
    let mut batch = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            if writer.to_flush.borrow().is_empty() {
                *writer.flusher_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        std::mem::swap(&mut batch, &mut *writer.to_flush.borrow_mut());
        for conn in batch.drain(..) {
            writer.flush_now(&conn);
        }
        writer.probe_load();
    }
}

/// Sends the flushes held for the write delay once due (see [`Writer::defer_flush`]).
pub(crate) async fn deferred_flusher<C: Outlet + 'static>(writer: Rc<Writer<C>>) {
    loop {
        std::future::poll_fn(|cx| {
            if writer.deferred.borrow().is_empty() {
                *writer.deferred_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        let now = monotonic_us();
        let front = writer.deferred.borrow().front().map(|(due, _)| *due);
        if let Some(due) = front
            && due > now
        {
            monoio::time::sleep(Duration::from_micros(due - now)).await;
            continue;
        }
        loop {
            let next = {
                let mut deferred = writer.deferred.borrow_mut();
                match deferred.front() {
                    Some((due, _)) if *due <= now => deferred.pop_front(),
                    _ => None,
                }
            };
            let Some((_, conn)) = next else { break };
            writer.send_queued(&conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_write_delay_doubles_under_saturation_holds_then_halves_away() {
        let max = 20_000;
        let mut delay = 0;
        let mut seen = Vec::new();
        for _ in 0..7 {
            delay = next_busy_delay(delay, 950, LOAD_PROBE_US, max);
            seen.push(delay);
        }
        assert_eq!(seen, [1000, 2000, 4000, 8000, 16000, 20000, 20000]);
        // Between the thresholds (the delay itself lowers the load) it holds.
        assert_eq!(next_busy_delay(delay, 899, LOAD_PROBE_US, max), 20_000);
        assert_eq!(next_busy_delay(delay, 500, LOAD_PROBE_US, max), 20_000);
        // Under 50 % it halves, and under half a millisecond it is off.
        let mut seen = Vec::new();
        for _ in 0..6 {
            delay = next_busy_delay(delay, 499, LOAD_PROBE_US, max);
            seen.push(delay);
        }
        assert_eq!(seen, [10_000, 5000, 2500, 1250, 625, 0]);
        // A pause in flushing resets it at once; a smaller cap bounds the first step too.
        assert_eq!(next_busy_delay(20_000, 1000, 11 * LOAD_PROBE_US, max), 0);
        assert_eq!(next_busy_delay(0, 1000, LOAD_PROBE_US, 300), 300);
    }

    #[test]
    fn the_load_probe_reads_a_growing_demand_or_turns_itself_off() {
        let mut probe = LoadProbe::default();
        let Some(first) = probe.read_demand_ns() else {
            // No schedstat on this kernel: the probe stays off for good.
            assert!(probe.read_demand_ns().is_none());
            return;
        };
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(0u64);
        }
        let second = probe.read_demand_ns().expect("read again");
        assert!(second >= first + 10_000_000, "{first} then {second}");
    }
}
