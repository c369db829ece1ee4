//! HTTP/1.1 on a shard: keep-alive request loop with bounded heads and bodies, the WebSocket
//! upgrades of `/ws` and `/socket.io/` (policy checks in SPEC §4 order), and every other path
//! handed to the server's route table.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use protocol::ErrorCode;
use protocol::http::{
    ChunkedDecoder, HttpError, HttpLimits, RequestHead, parse_request_head, write_error,
    write_response,
};
use protocol::ws::{check_upgrade, select_subprotocol, write_accept};

use crate::auth::{AuthFailure, ClientInfo};
use crate::frames::Dialect;
use crate::routes::{HttpRequest, HttpResponse, Routed};
use crate::shard::Shard;
use crate::shared::{CapRefusal, PendingSlot};

/// How long a keep-alive connection may sit between requests (a request, once its first byte is
/// here, has `http_head_timeout` and `http_body_timeout`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a deferred route (storage, hashing) may take before the client gets 503.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);

fn resolve_client_ip(shard: &Shard, peer: SocketAddr, head: &RequestHead) -> IpAddr {
    let lines: Vec<&[u8]> = head.headers_named("x-forwarded-for").collect();
    crate::net::client_ip(
        peer.ip(),
        lines.into_iter(),
        &shard.shared.config.trusted_proxies,
    )
}

struct Refusal {
    status: u16,
    code: ErrorCode,
    message: &'static str,
    metric: &'static str,
}

fn refusal(status: u16, code: ErrorCode, message: &'static str, metric: &'static str) -> Refusal {
    Refusal {
        status,
        code,
        message,
        metric,
    }
}

/// Serves one accepted TCP connection until it closes or upgrades.
///
/// Every request is bounded in time as well as size: its head must be complete within
/// `http_head_timeout` of its first byte and its body within `http_body_timeout` of the head,
/// however slowly the bytes trickle in (slow-loris); between requests a keep-alive connection may
/// idle for [`IDLE_TIMEOUT`]. Until it is an authenticated WebSocket the connection holds a
/// [`PendingSlot`] of its peer's address (for a trusted proxy, of the forwarded client, taken at
/// the upgrade request).
pub(crate) async fn serve(shard: Rc<Shard>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let cfg = &shard.shared.config;
    let from_proxy = cfg
        .trusted_proxies
        .iter()
        .any(|net| net.contains(peer.ip()));
    let mut slot = None;
    if !from_proxy {
        match shard.shared.pending_enter(peer.ip()) {
            Some(taken) => slot = Some(taken),
            None => {
                refuse_pending(&shard, &mut stream, None).await;
                return;
            }
        }
    }
    let limits = HttpLimits::default();
    let head_timeout = micros(cfg.http_head_timeout);
    let body_timeout = micros(cfg.http_body_timeout);
    let mut data: Vec<u8> = Vec::new();
    loop {
        if data.is_empty() {
            let idle_until = crate::clock::monotonic_us().saturating_add(micros(IDLE_TIMEOUT));
            if !read_more(&shard, &mut stream, &mut data, idle_until).await {
                return;
            }
        }
        // The request's first byte is here: its head has `http_head_timeout` from now.
        let head_until = crate::clock::monotonic_us().saturating_add(head_timeout);
        let head = loop {
            match parse_request_head(&data, &limits) {
                Ok(Some(head)) => break head,
                Ok(None) => {
                    if !read_more(&shard, &mut stream, &mut data, head_until).await {
                        return;
                    }
                }
                Err(e) => {
                    refuse_request(&mut stream, &e).await;
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
                        refuse_request(&mut stream, &e).await;
                        return;
                    }
                }
                if decoder.is_done() {
                    break;
                }
                if !read_more(&shard, &mut stream, &mut data, body_until).await {
                    return;
                }
            }
            chunked_body = Some(decoder.into_body());
        } else {
            while data.len() < head.content_length {
                if !read_more(&shard, &mut stream, &mut data, body_until).await {
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
            let ip = resolve_client_ip(&shard, peer, &head);
            let slot = match slot.take() {
                Some(slot) => slot,
                None => match shard.shared.pending_enter(ip) {
                    Some(slot) => slot,
                    None => {
                        refuse_pending(&shard, &mut stream, Some(&request_id)).await;
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
        let client_ip = resolve_client_ip(&shard, peer, &head);
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
async fn refuse_request(stream: &mut TcpStream, e: &HttpError) {
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
async fn refuse_pending(shard: &Shard, stream: &mut TcpStream, request_id: Option<&str>) {
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
async fn read_more(shard: &Shard, stream: &mut TcpStream, data: &mut Vec<u8>, until: u64) -> bool {
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

fn bearer(head: &RequestHead) -> Option<String> {
    if let Some(value) = head.header_str("authorization") {
        let mut parts = value.trim().splitn(2, ' ');
        if parts
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        {
            return parts
                .next()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
        }
    }
    head.query_param("token")
        .map(|t| t.into_owned())
        .filter(|t| !t.is_empty())
}

fn origin_allowed(shard: &Shard, head: &RequestHead) -> bool {
    let cfg = &shard.shared.config;
    match head.header_str("origin") {
        None => cfg.allow_missing_origin,
        Some(origin) => {
            cfg.allowed_origins.is_empty() || cfg.allowed_origins.iter().any(|o| o == origin)
        }
    }
}

async fn respond_refusal(
    mut stream: TcpStream,
    r: &Refusal,
    request_id: &str,
    extra: &[(&str, &str)],
) {
    let mut headers = vec![("X-Request-Id", request_id)];
    headers.extend_from_slice(extra);
    let mut out = Vec::new();
    write_error(&mut out, r.status, r.code, r.message, &headers, false);
    let _ = stream.write_all(out).await;
}

/// An upgrade request as the request loop hands it over.
struct Upgrade {
    peer: SocketAddr,
    head: RequestHead,
    /// Bytes read after the request (the client's first frames).
    leftover: Vec<u8>,
    request_id: String,
    socketio: bool,
    /// Held until the connection is an authenticated WebSocket.
    slot: PendingSlot,
}

async fn upgrade(shard: Rc<Shard>, mut stream: TcpStream, request: Upgrade) {
    let Upgrade {
        peer,
        head,
        leftover,
        request_id,
        socketio,
        slot,
    } = request;
    let metrics = &shard.shared.metrics;
    // Protocol validity first (it is not a policy decision), then SPEC §4's order.
    let upgrade = match check_upgrade(&head) {
        Ok(u) => u,
        Err(e) => {
            let status = e.status();
            let r = refusal(
                status,
                ErrorCode::BadRequest,
                "not a valid WebSocket upgrade",
                "bad_request",
            );
            metrics.connect(r.metric);
            let extra: &[(&str, &str)] = if status == 426 {
                &[("Sec-WebSocket-Version", "13")]
            } else {
                &[]
            };
            respond_refusal(stream, &r, &request_id, extra).await;
            return;
        }
    };
    if socketio
        && (head.query_param("EIO").as_deref() != Some("4")
            || head.query_param("transport").as_deref() != Some("websocket"))
    {
        let r = refusal(
            400,
            ErrorCode::Unsupported,
            "only EIO=4 over transport=websocket is supported",
            "bad_request",
        );
        metrics.connect(r.metric);
        respond_refusal(stream, &r, &request_id, &[]).await;
        return;
    }
    let dialect = if socketio {
        Dialect::SocketIo
    } else {
        match select_subprotocol(&upgrade.offered) {
            Ok((p, _)) => Dialect::Native(p),
            Err(_) => {
                let r = refusal(
                    400,
                    ErrorCode::Unsupported,
                    "no supported subprotocol offered",
                    "bad_request",
                );
                metrics.connect(r.metric);
                respond_refusal(stream, &r, &request_id, &[]).await;
                return;
            }
        }
    };
    let ip = resolve_client_ip(&shard, peer, &head);
    if !shard.shared.check_connect_rate(ip) {
        metrics.rate_limited("connect_per_ip");
        let r = refusal(
            429,
            ErrorCode::RateLimited,
            "too many connection attempts",
            "rate_limited",
        );
        metrics.connect(r.metric);
        respond_refusal(stream, &r, &request_id, &[("Retry-After", "1")]).await;
        return;
    }
    if !origin_allowed(&shard, &head) {
        let r = refusal(
            403,
            ErrorCode::Forbidden,
            "origin not allowed",
            "origin_forbidden",
        );
        metrics.connect(r.metric);
        respond_refusal(stream, &r, &request_id, &[]).await;
        return;
    }
    let user_agent = head.header_str("user-agent").map(str::to_owned);
    let client = ClientInfo {
        ip,
        user_agent: user_agent.as_deref(),
    };
    let token = bearer(&head);
    let identity = if socketio {
        None
    } else {
        let verified = match &token {
            Some(t) => shard.shared.auth.verify_access(t, &client),
            None => Err(AuthFailure::Missing),
        };
        match verified {
            Ok(identity) => Some(identity),
            Err(reason) => {
                metrics.auth_failure(reason);
                let r = refusal(
                    401,
                    ErrorCode::InvalidToken,
                    "invalid token",
                    "unauthorized",
                );
                metrics.connect(r.metric);
                respond_refusal(stream, &r, &request_id, &[]).await;
                return;
            }
        }
    };
    let conn_id = shard.next_conn_id();
    let replaced = match &identity {
        Some(identity) => {
            match shard
                .shared
                .admit(ip, &identity.user_id, &identity.username, conn_id)
            {
                Ok(replaced) => replaced,
                Err(refused) => {
                    let r = cap_refusal(refused);
                    metrics.connect(r.metric);
                    respond_refusal(stream, &r, &request_id, &[]).await;
                    return;
                }
            }
        }
        None => None,
    };
    let mut accept = Vec::with_capacity(256);
    let protocol = match dialect {
        Dialect::Native(p) if !upgrade.offered.is_empty() => Some(p),
        _ => None,
    };
    write_accept(&mut accept, &upgrade.key, protocol);
    let (result, _) = stream.write_all(accept).await;
    if result.is_err() {
        if let Some(identity) = &identity {
            shard.shared.release(ip, &identity.user_id, conn_id);
        }
        return;
    }
    match identity {
        Some(identity) => {
            drop(slot);
            // A task of its own: the HTTP phase (request head, buffers, token) is freed when this
            // function returns, so an idle connection keeps only its session state.
            let accepted = crate::ws::Accepted {
                stream,
                leftover,
                identity,
                dialect,
                ip,
                replaced,
                id: conn_id,
            };
            crate::ws::run(&shard, accepted);
        }
        None => {
            let query_token = token;
            let Some(connected) = crate::sio::handshake(&shard, stream, query_token, client).await
            else {
                return;
            };
            let mut stream = connected.stream;
            drop(slot);
            match shard.shared.admit(
                ip,
                &connected.identity.user_id,
                &connected.identity.username,
                conn_id,
            ) {
                Ok(replaced) => {
                    let accepted = crate::ws::Accepted {
                        stream,
                        leftover: connected.leftover,
                        identity: connected.identity,
                        dialect,
                        ip,
                        replaced,
                        id: conn_id,
                    };
                    crate::ws::run(&shard, accepted);
                }
                Err(refused) => {
                    metrics.connect(cap_refusal(refused).metric);
                    crate::sio::refuse(&mut stream, cap_refusal(refused).message).await;
                }
            }
        }
    }
}

fn cap_refusal(refused: CapRefusal) -> Refusal {
    match refused {
        CapRefusal::TooManyForIp => refusal(
            429,
            ErrorCode::RateLimited,
            "too many connections from this address",
            "capacity",
        ),
        CapRefusal::TooManyForUser => refusal(
            409,
            ErrorCode::Conflict,
            "too many connections for this user",
            "conflict",
        ),
    }
}
