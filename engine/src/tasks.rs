//! A shard's tasks: the dispatcher (it waits on the mailbox and has `router` pump it, each message
//! to its owner, `home` or `session`), the reader of its connections, the ticker of its periodic
//! duties, and the accept loop. It decides nothing about rooms or connections.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::clock::now_ms;
use crate::shard::Shard;
use crate::state::Counters;
use crate::sys::ReadySet;

/// The periodic duties of a shard: heartbeats, idle and expiry closes, refresh warnings,
/// revocation checks, presence flushes.
pub(crate) async fn ticker(shard: Rc<Shard>) {
    let cfg = &shard.shared.config;
    let tick = cfg
        .presence_batch
        .clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut last_scan = 0u64;
    let mut scans = 0usize;
    loop {
        monoio::time::sleep(tick).await;
        if shard.stopping.get() && shard.conns.borrow().is_empty() {
            return;
        }
        send_due(&shard);
        crate::home::flush_presence(&shard);
        crate::router::pump(&shard);
        let now = now_ms();
        if now.saturating_sub(last_scan) < 250 {
            continue;
        }
        last_scan = now;
        // Each shard sweeps its share of the per-IP table's stripes, one per scan: every stripe
        // is swept about every `STRIPES / shards` scans (2 s on 2 shards).
        scans = scans.wrapping_add(1);
        crate::home::expire_history(&shard);
        crate::broker::upkeep(&shard);
        shard
            .shared
            .state
            .upkeep(scans.wrapping_mul(shard.shared.config.shards) + shard.id);
        crate::session::scan(&shard, now);
        crate::router::pump(&shard);
    }
}

/// Sends the delayed messages that are due (they were queued with one fixed delay, so in order).
fn send_due(shard: &Rc<Shard>) {
    let now = crate::clock::monotonic_us();
    loop {
        let next = {
            let mut delayed = shard.delayed.borrow_mut();
            match delayed.front() {
                Some((due, _, _)) if *due <= now => delayed.pop_front(),
                _ => None,
            }
        };
        let Some((_, home, msg)) = next else { break };
        shard.dispatch(home, msg);
    }
}

/// Reads the shard's WebSocket connections as they turn readable: one task for all of them, so
/// that an idle connection costs no task and no operation in flight (see [`ReadySet`]).
pub(crate) async fn reader(shard: Rc<Shard>) {
    let mut tokens = Vec::new();
    loop {
        if let Err(e) = shard.ready_set.wait().await {
            tracing::error!(shard = shard.id, error = %e, "waiting for readable connections");
            monoio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        loop {
            shard.ready_set.ready(&mut tokens);
            for &id in &tokens {
                if let Some(conn) = shard.conn(id) {
                    crate::session::on_readable(&shard, &conn);
                    crate::router::pump(&shard);
                }
            }
            if !ReadySet::batch_full(&tokens) {
                break;
            }
            // A long burst: let writers and the mailbox run between batches.
            yield_now().await;
        }
    }
}

/// Handles the messages of the shard's mailbox and outbox forever: after each one, what it made
/// the shard send itself (see [`crate::router::pump`]).
pub(crate) async fn dispatcher(shard: Rc<Shard>) {
    let mailbox = &shard.shared.mailboxes[shard.id];
    loop {
        std::future::poll_fn(|cx| {
            if shard.has_local() {
                return Poll::Ready(());
            }
            *shard.outbox_waker.borrow_mut() = Some(cx.waker().clone());
            mailbox.poll_ready(cx)
        })
        .await;
        crate::router::pump(&shard);
        let mut handled = 0i64;
        while let Some(msg) = mailbox.pop() {
            handled += 1;
            crate::router::handle(&shard, msg);
            crate::router::pump(&shard);
            // Let connections and writers run between long bursts.
            if handled % 256 == 0 {
                shard.shared.metrics.queue_depth(shard.id, -256);
                handled = 0;
                yield_now().await;
            }
        }
        shard.shared.metrics.queue_depth(shard.id, -handled);
        if shard.stopping.get() && shard.conns.borrow().is_empty() && mailbox.len() == 0 {
            return;
        }
    }
}

/// Yields once to the shard's other tasks.
pub(crate) fn yield_now() -> impl Future<Output = ()> {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false)
}

/// Runs a shard: its tasks, then its accept loop until it is told to stop, then the graceful close
/// of its connections.
pub(crate) async fn shard_main(shard: Rc<Shard>, listener: monoio::net::TcpListener) {
    monoio::spawn(dispatcher(shard.clone()));
    monoio::spawn(ticker(shard.clone()));
    monoio::spawn(reader(shard.clone()));
    monoio::spawn(crate::writer::flusher(shard.writer.clone()));
    monoio::spawn(crate::writer::deferred_flusher(shard.writer.clone()));
    crate::broker::start(&shard);
    loop {
        let stopped = StopSignal(shard.clone());
        monoio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        monoio::spawn(crate::http::serve(shard.clone(), stream, peer));
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.id, error = %e, "accept failed");
                        monoio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            () = stopped => break,
        }
    }
    drop(listener);
    // Close every WebSocket with 1001 and wait (bounded) for them to drain.
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for conn in conns {
        shard.writer.close(&conn, protocol::CloseCode::GOING_AWAY);
    }
    let deadline =
        now_ms() + u64::try_from(shard.shared.config.shutdown_grace.as_millis()).unwrap_or(5000);
    while !shard.conns.borrow().is_empty() && now_ms() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for conn in conns {
        conn.abort();
    }
    monoio::time::sleep(Duration::from_millis(20)).await;
}

/// Resolves when the shard is told to stop.
struct StopSignal(Rc<Shard>);

impl Future for StopSignal {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.stopping.get() {
            return Poll::Ready(());
        }
        *self.0.stop_waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}
