//! Cross-shard queues: a lock-free multi-producer queue per shard (crossbeam `SegQueue`) and a
//! waker that the owning shard's dispatcher parks on. A push wakes the shard only when it is
//! parked, so a burst of pushes costs one wake-up, not one per message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

/// One shard's inbox.
#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    queue: SegQueue<T>,
    waker: AtomicWaker,
    parked: AtomicBool,
}

impl<T> Mailbox<T> {
    pub(crate) fn new() -> Self {
        Self {
            queue: SegQueue::new(),
            waker: AtomicWaker::new(),
            parked: AtomicBool::new(false),
        }
    }

    /// Pushes from any thread; wakes the owner if it sleeps.
    pub(crate) fn push(&self, item: T) {
        self.queue.push(item);
        if self.parked.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Takes one item (owner only).
    pub(crate) fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Items waiting.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Ready when the queue is not empty; otherwise parks `cx`'s waker (owner only).
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.queue.is_empty() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        self.parked.store(true, Ordering::Release);
        // A push between the check and `parked` would otherwise be missed.
        if self.queue.is_empty() {
            Poll::Pending
        } else {
            self.parked.store(false, Ordering::Release);
            Poll::Ready(())
        }
    }
}
