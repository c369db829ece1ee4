//! Answers that another thread produces: the server's route table hands slow work (password
//! hashing, storage) to its blocking pools and returns a [`PendingResponse`]; the pool completes
//! it through the [`ResponseSender`], which wakes the shard. Nothing here blocks a shard.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use protocol::ErrorCode;

use crate::response::HttpResponse;

struct Slot {
    response: Mutex<Option<HttpResponse>>,
    done: AtomicBool,
    waker: AtomicWaker,
}

/// Completes one [`PendingResponse`] from any thread. Dropped without [`ResponseSender::send`]
/// (a panicking job), the request is answered 500 `internal`.
pub struct ResponseSender {
    slot: Option<Arc<Slot>>,
}

/// The shard's side of a deferred answer.
pub struct PendingResponse {
    slot: Arc<Slot>,
    extra_headers: Vec<(&'static str, String)>,
}

impl PendingResponse {
    /// Headers added to the answer when it arrives (CORS, for instance).
    pub fn add_headers(&mut self, headers: Vec<(&'static str, String)>) {
        self.extra_headers.extend(headers);
    }
}

impl std::fmt::Debug for ResponseSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseSender")
    }
}

impl std::fmt::Debug for PendingResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingResponse")
    }
}

/// A connected sender and pending answer.
pub fn pending_response() -> (ResponseSender, PendingResponse) {
    let slot = Arc::new(Slot {
        response: Mutex::new(None),
        done: AtomicBool::new(false),
        waker: AtomicWaker::new(),
    });
    (
        ResponseSender {
            slot: Some(slot.clone()),
        },
        PendingResponse {
            slot,
            extra_headers: Vec::new(),
        },
    )
}

impl ResponseSender {
    /// Delivers the answer and wakes the shard.
    pub fn send(mut self, response: HttpResponse) {
        if let Some(slot) = self.slot.take() {
            complete(&slot, response);
        }
    }
}

fn complete(slot: &Slot, response: HttpResponse) {
    *slot
        .response
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(response);
    slot.done.store(true, Ordering::Release);
    slot.waker.wake();
}

impl Drop for ResponseSender {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            complete(
                &slot,
                HttpResponse::error(500, ErrorCode::Internal, "internal error"),
            );
        }
    }
}

impl Future for PendingResponse {
    type Output = HttpResponse;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HttpResponse> {
        if !self.slot.done.load(Ordering::Acquire) {
            self.slot.waker.register(cx.waker());
            if !self.slot.done.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        let taken = self
            .slot
            .response
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut response = taken
            .unwrap_or_else(|| HttpResponse::error(500, ErrorCode::Internal, "internal error"));
        response.headers.append(&mut self.extra_headers);
        Poll::Ready(response)
    }
}
