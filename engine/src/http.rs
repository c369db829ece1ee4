//! HTTP/1.1 on a shard: the keep-alive request loop with heads and bodies bounded in size and in
//! time, the per-IP cap on connections in progress, every path handed to the server's route
//! table, except `/ws` and `/socket.io/`, which go to [`crate::upgrade`].

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use protocol::ErrorCode;
use protocol::http::{
    ChunkedDecoder, HttpError, HttpLimits, RequestHead, parse_request_head, write_error,
    write_response,
};

use crate::net::request_client_ip;
use crate::response::HttpResponse;
use crate::routes::{HttpRequest, Routed};
use crate::shard::Shard;
use crate::tls::Tls;
use crate::transport::{Stream, Transport};
use crate::upgrade::{Upgrade, upgrade};

/// How long a keep-alive connection may sit between requests (a request, once its first byte is
/// here, has `http_head_timeout` and `http_body_timeout`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a deferred route (storage, hashing) may take before the client gets 503.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted TCP connection until it closes or upgrades; over TLS when the listener
/// serves it (the handshake first, within `tls_handshake_timeout`, holding the pending slot).
///
/// Every request is bounded in time as well as size: its head must be complete within
/// `http_head_timeout` of its first byte and its body within `http_body_timeout` of the head,
/// however slowly the bytes trickle in (slow-loris); between requests a keep-alive connection may
/// idle for [`IDLE_TIMEOUT`]. Until it is an authenticated WebSocket the connection holds a
/// [`PendingSlot`] of its peer's address (for a trusted proxy, of the forwarded client, taken at
/// the upgrade request).
pub(crate) async fn serve(shard: Rc<Shard>, tcp: monoio::net::TcpStream, peer: SocketAddr) {
    let cfg = &shard.shared.config;
    let from_proxy = cfg
        .trusted_proxies
        .iter()
        .any(|net| net.contains(peer.ip()));
    let tls = shard.shared.tls_config();
    let mut slot = None;
    if !from_proxy {
        match shard.shared.pending_enter(peer.ip()) {
            Some(taken) => slot = Some(taken),
            // Over TLS nothing can be said before a handshake: the socket is closed.
            None if tls.is_some() => return,
            None => {
                refuse_pending(&shard, &Stream::tcp(tcp), None).await;
                return;
            }
        }
    }
    let stream = match tls {
        None => Stream::tcp(tcp),
        Some(config) => {
            let limit = cfg
                .tls
                .as_ref()
                .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
            let outcome = monoio::time::timeout(limit, Tls::accept(tcp, config)).await;
            let metrics = &shard.shared.metrics;
            let (stream, result) = match outcome {
                Ok(Ok(tls)) => (Some(Stream::tls(tls)), 0),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer.ip(), error = %e, "tls handshake failed");
                    (None, 1)
                }
                Err(_) => (None, 2),
            };
            metrics.tls_handshakes[result].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match stream {
                Some(stream) => stream,
                None => return,
            }
        }
    };
    let limits = HttpLimits::default();
    let head_timeout = micros(cfg.http_head_timeout);
    let body_timeout = micros(cfg.http_body_timeout);
    let mut data: Vec<u8> = Vec::new();
    loop {
        if data.is_empty() {
            let idle_until = crate::clock::monotonic_us().saturating_add(micros(IDLE_TIMEOUT));
            if !read_more(&shard, &stream, &mut data, idle_until).await {
                return;
            }
        }
        // The request's first byte is here: its head has `http_head_timeout` from now.
        let head_until = crate::clock::monotonic_us().saturating_add(head_timeout);
        let head = loop {
            match parse_request_head(&data, &limits) {
                Ok(Some(head)) => break head,
                Ok(None) => {
                    if !read_more(&shard, &stream, &mut data, head_until).await {
                        return;
                    }
                }
                Err(e) => {
                    refuse_request(&stream, &e).await;
                    return;
                }
            }
        };
        data.drain(..head.head_len);
        let has_body = head.chunked || head.content_length > 0;
        if has_body && data.is_empty() && head.header_has_token("expect", "100-continue") {
            let (result, _) = stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
                .await;
            if result.is_err() {
                return;
            }
        }
        let body_until = crate::clock::monotonic_us().saturating_add(body_timeout);
        // A chunked body is decoded out of `data` as it arrives (only the decoded body is kept);
        // a `Content-Length` body is read into `data` and used in place.
        let mut chunked_body = None;
        if head.chunked {
            let mut decoder = ChunkedDecoder::new(limits.max_body_bytes);
            loop {
                match decoder.feed(&data) {
                    Ok(used) => {
                        data.drain(..used);
                    }
                    Err(e) => {
                        refuse_request(&stream, &e).await;
                        return;
                    }
                }
                if decoder.is_done() {
                    break;
                }
                if !read_more(&shard, &stream, &mut data, body_until).await {
                    return;
                }
            }
            chunked_body = Some(decoder.into_body());
        } else {
            while data.len() < head.content_length {
                if !read_more(&shard, &stream, &mut data, body_until).await {
                    return;
                }
            }
        }
        let consumed = if chunked_body.is_some() {
            0
        } else {
            head.content_length
        };
        let request_id = request_id(&shard, &head);
        let socketio = match head.path() {
            "/ws" => Some(false),
            "/socket.io/" | "/socket.io" => Some(true),
            _ => None,
        };
        if let Some(socketio) = socketio {
            let ip = request_client_ip(peer.ip(), &head, &shard.shared.config.trusted_proxies);
            let slot = match slot.take() {
                Some(slot) => slot,
                None => match shard.shared.pending_enter(ip) {
                    Some(slot) => slot,
                    None => {
                        refuse_pending(&shard, &stream, Some(&request_id)).await;
                        return;
                    }
                },
            };
            let leftover = data[consumed..].to_vec();
            let request = Upgrade {
                peer,
                head,
                leftover,
                request_id,
                socketio,
                slot,
            };
            upgrade(shard, stream, request).await;
            return;
        }
        let client_ip = request_client_ip(peer.ip(), &head, &shard.shared.config.trusted_proxies);
        let body = chunked_body.as_deref().unwrap_or(&data[..consumed]);
        let routed = shard.shared.routes.handle(&HttpRequest {
            head: &head,
            body,
            peer,
            client_ip,
            request_id: &request_id,
        });
        let response = match routed {
            Routed::Now(response) => response,
            Routed::Later(pending) => match monoio::time::timeout(ROUTE_TIMEOUT, pending).await {
                Ok(response) => response,
                Err(_) => HttpResponse::error(503, ErrorCode::Unavailable, "try again later"),
            },
        };
        tracing::debug!(
            request_id = %request_id,
            method = %head.method,
            path = %head.target_for_log(),
            status = response.status,
            "http"
        );
        let keep_alive = head.keep_alive() && !shard.stopping.get();
        let mut out = Vec::with_capacity(256 + response.body.len());
        let mut headers: Vec<(&str, &str)> = response
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        headers.push(("X-Request-Id", &request_id));
        write_response(
            &mut out,
            response.status,
            &headers,
            &response.body,
            keep_alive,
        );
        let (result, _) = stream.write_all(out).await;
        if result.is_err() || !keep_alive {
            return;
        }
        data.drain(..consumed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Answers a request that cannot be served (a bad head or body) and closes.
async fn refuse_request(stream: &Stream, e: &HttpError) {
    let status = e.status();
    let code = match e {
        HttpError::BodyTooLarge(_) | HttpError::HeadTooLarge(_) | HttpError::TooManyHeaders(_) => {
            ErrorCode::TooLarge
        }
        _ => ErrorCode::BadRequest,
    };
    let mut out = Vec::new();
    write_error(&mut out, status, code, &e.to_string(), &[], false);
    let _ = stream.write_all(out).await;
}

/// Answers a connection past `max_pending_per_ip` with 429 and closes it.
async fn refuse_pending(shard: &Shard, stream: &Stream, request_id: Option<&str>) {
    shard.shared.metrics.rate_limited("pending_per_ip");
    let mut headers = vec![("Retry-After", "1")];
    if let Some(id) = request_id {
        headers.push(("X-Request-Id", id));
    }
    let mut out = Vec::new();
    write_error(
        &mut out,
        429,
        ErrorCode::RateLimited,
        "too many connections in progress from this address",
        &headers,
        false,
    );
    let _ = stream.write_all(out).await;
}

/// Reads what arrives into `data`, waiting until `until` ([`crate::clock::monotonic_us`]) at most;
/// false at the end of the stream, on an error, or past `until`.
async fn read_more(shard: &Shard, stream: &Stream, data: &mut Vec<u8>, until: u64) -> bool {
    let left = until.saturating_sub(crate::clock::monotonic_us());
    if left == 0 {
        return false;
    }
    let wait = Duration::from_micros(left).min(IDLE_TIMEOUT);
    let Ok(result) = monoio::time::timeout(wait, shard.buffers.read_ready(stream, true)).await
    else {
        return false;
    };
    let Ok(buf) = result else { return false };
    let ok = !buf.is_empty();
    data.extend_from_slice(&buf);
    shard.buffers.put(buf);
    ok
}

fn request_id(shard: &Shard, head: &RequestHead) -> String {
    match head.header_str("x-request-id") {
        Some(id)
            if !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            id.to_owned()
        }
        _ => format!(
            "{:x}-{:x}",
            shard.id,
            shard.next_conn_id() & 0xFFFF_FFFF_FFFF
        ),
    }
}
