//! The WebSocket upgrades of `/ws` and `/socket.io/` (SPEC §4, §8): protocol checks, then the
//! policy checks in SPEC §4's order (connect rate, origin, token, caps), the 101, and for
//! Socket.IO the Engine.IO open packet and the wait for CONNECT with its token. An admitted
//! connection is handed to [`crate::session`]; until then it holds its pending slot.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use protocol::ErrorCode;
use protocol::http::{RequestHead, write_error};
use protocol::socketio::{self, EnginePacket, PacketType};
use protocol::ws::{
    self, Message, MessageDecoder, check_upgrade, select_subprotocol, write_accept,
};

use crate::auth::{AuthFailure, ClientInfo, Identity};
use crate::frames::{Dialect, socketio_frame};
use crate::net::request_client_ip;
use crate::shard::Shard;
use crate::state::{CapRefusal, Counters, PendingSlot};
use crate::transport::{Stream, Transport};

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
        Some(origin) => crate::shared::origin_in(&shard.shared.allowed_origins(), origin),
    }
}

async fn respond_refusal(stream: Stream, r: &Refusal, request_id: &str, extra: &[(&str, &str)]) {
    let mut headers = vec![("X-Request-Id", request_id)];
    headers.extend_from_slice(extra);
    let mut out = Vec::new();
    write_error(&mut out, r.status, r.code, r.message, &headers, false);
    let _ = stream.write_all(out).await;
}

/// An upgrade request as the request loop hands it over.
pub(crate) struct Upgrade {
    pub(crate) peer: SocketAddr,
    pub(crate) head: RequestHead,
    /// Bytes read after the request (the client's first frames).
    pub(crate) leftover: Vec<u8>,
    pub(crate) request_id: String,
    pub(crate) socketio: bool,
    /// Held until the connection is an authenticated WebSocket.
    pub(crate) slot: PendingSlot,
}

pub(crate) async fn upgrade(shard: Rc<Shard>, stream: Stream, request: Upgrade) {
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
    let ip = request_client_ip(peer.ip(), &head, &shard.shared.config.trusted_proxies);
    if !shard.shared.state.connect_allowed(ip) || !connect_allowed_across_nodes(&shard, ip).await {
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
    let origin = shard.intern_origin(head.header_str("origin"));
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
                .state
                .admit(ip, &identity.user_id, &identity.username, conn_id)
            {
                Ok(replaced) => {
                    if !admitted_across_nodes(&shard, &identity.user_id, conn_id).await {
                        shard.shared.state.release(ip, &identity.user_id, conn_id);
                        let r = cap_refusal(CapRefusal::TooManyForUser);
                        metrics.connect(r.metric);
                        respond_refusal(stream, &r, &request_id, &[]).await;
                        return;
                    }
                    replaced
                }
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
            shard.shared.state.release(ip, &identity.user_id, conn_id);
        }
        return;
    }
    match identity {
        Some(identity) => {
            drop(slot);
            // A task of its own: the HTTP phase (request head, buffers, token) is freed when this
            // function returns, so an idle connection keeps only its session state.
            let accepted = crate::session::Accepted {
                stream,
                leftover,
                identity,
                dialect,
                ip,
                replaced,
                id: conn_id,
                origin,
            };
            crate::session::run(&shard, accepted);
            crate::router::pump(&shard);
        }
        None => {
            let query_token = token;
            let Some(connected) = socketio_handshake(&shard, stream, query_token, client).await
            else {
                return;
            };
            let stream = connected.stream;
            drop(slot);
            match shard.shared.state.admit(
                ip,
                &connected.identity.user_id,
                &connected.identity.username,
                conn_id,
            ) {
                Ok(replaced)
                    if !admitted_across_nodes(&shard, &connected.identity.user_id, conn_id)
                        .await =>
                {
                    let _ = replaced;
                    shard
                        .shared
                        .state
                        .release(ip, &connected.identity.user_id, conn_id);
                    let refused = cap_refusal(CapRefusal::TooManyForUser);
                    metrics.connect(refused.metric);
                    refuse_socketio(&stream, refused.message).await;
                }
                Ok(replaced) => {
                    let accepted = crate::session::Accepted {
                        stream,
                        leftover: connected.leftover,
                        identity: connected.identity,
                        dialect,
                        ip,
                        replaced,
                        id: conn_id,
                        origin,
                    };
                    crate::session::run(&shard, accepted);
                    crate::router::pump(&shard);
                }
                Err(refused) => {
                    metrics.connect(cap_refusal(refused).metric);
                    refuse_socketio(&stream, cap_refusal(refused).message).await;
                }
            }
        }
    }
}

/// With Redis: whether `connect_per_ip` counted over every node allows this attempt (after the
/// node's own bucket did). Without Redis, or when it does not answer, the node's bucket decided.
async fn connect_allowed_across_nodes(shard: &Rc<Shard>, ip: std::net::IpAddr) -> bool {
    let spec = &shard.shared.config.connect_per_ip;
    if spec.count == 0 || !crate::broker::is_up(shard) {
        return true;
    }
    let group = crate::net::ip_group(ip);
    let ask = crate::shared_limits::SharedAsk::Take {
        key: format!("connect_per_ip:{group}"),
        per_token_ms: spec.per.as_secs_f64() * 1000.0 / f64::from(spec.count),
        burst: spec.burst.max(1),
    };
    !matches!(
        crate::broker::shared_limit_here(shard, &ask).await,
        crate::shared_limits::Verdict::Limited { .. }
    )
}

/// With Redis: whether the user's connection cap over every node admits this connection (a
/// replaced connection elsewhere is closed by its node). Without Redis, or when Redis does not
/// answer, the node's own count (already taken) decides.
async fn admitted_across_nodes(shard: &Rc<Shard>, user: &str, conn: crate::conn::ConnId) -> bool {
    if !crate::broker::is_up(shard) {
        return true;
    }
    !matches!(
        crate::broker::admit_user(shard, user, conn).await,
        crate::broker::Admission::Refused
    )
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

/// What the pre-registration handshake produced.
struct Connected {
    pub(crate) stream: Stream,
    pub(crate) leftover: Vec<u8>,
    pub(crate) identity: Identity,
}

/// Most bytes buffered from a socket before its CONNECT: a CONNECT packet with the longest token
/// accepted (8 KiB) fits with room to spare, and an unauthenticated socket holds no more.
const MAX_BEFORE_CONNECT: usize = 16 * 1024;

/// After the 101: sends the Engine.IO open packet and waits (at most `http_head_timeout`, like a
/// request head) for the Socket.IO CONNECT on `/`, whose auth payload (or the `token` query
/// parameter) must hold a valid access token; at most [`MAX_BEFORE_CONNECT`] bytes are buffered
/// meanwhile. On failure a CONNECT_ERROR is sent and `None` returned.
async fn socketio_handshake(
    shard: &Rc<Shard>,
    stream: Stream,
    query_token: Option<String>,
    client: ClientInfo<'_>,
) -> Option<Connected> {
    let cfg = &shard.shared.config;
    let heartbeat = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(25_000);
    let sid = format!("s{}{:x}", shard.shared.instance, shard.next_conn_id());
    let open = socketio::encode_open(
        &sid,
        heartbeat,
        heartbeat + 10_000,
        cfg.max_message_bytes as u64,
    );
    let (result, _) = stream.write_all(socketio_frame(&open).to_vec()).await;
    result.ok()?;
    let mut decoder = MessageDecoder::new();
    let mut pending: Vec<u8> = Vec::new();
    let wait_ms = u64::try_from(cfg.http_head_timeout.as_millis()).unwrap_or(10_000);
    let deadline = crate::clock::now_ms() + wait_ms;
    loop {
        // Parse what we have.
        let mut offset = 0;
        while offset < pending.len() {
            let decoded = decoder
                .decode(&mut pending[offset..], MAX_BEFORE_CONNECT)
                .ok()?;
            if decoded.consumed == 0 {
                break;
            }
            offset += decoded.consumed;
            let Some(Message::Text(text)) = decoded.message else {
                continue;
            };
            let text = std::str::from_utf8(text.as_bytes()).ok()?.to_owned();
            let Ok(EnginePacket::Message(inner)) = socketio::parse_engine_packet(&text) else {
                continue;
            };
            let packet = match socketio::parse_socket_packet(inner) {
                Ok(p) if p.kind == PacketType::Connect => p,
                Ok(_) => continue,
                Err(_) => {
                    refuse_socketio(&stream, "invalid namespace").await;
                    return None;
                }
            };
            let token = socketio::connect_token(&packet, &crate::sio::limits(&shard.shared.config))
                .or_else(|| query_token.clone());
            let verified = match token {
                Some(token) => shard.shared.auth.verify_access(&token, &client),
                None => Err(AuthFailure::Missing),
            };
            match verified {
                Ok(identity) => {
                    let leftover = pending[offset..].to_vec();
                    return Some(Connected {
                        stream,
                        leftover,
                        identity,
                    });
                }
                Err(reason) => {
                    shard.shared.metrics.auth_failure(reason);
                    shard.shared.metrics.connect("unauthorized");
                    refuse_socketio(&stream, "unauthorized").await;
                    return None;
                }
            }
        }
        pending.drain(..offset);
        let remaining = deadline.saturating_sub(crate::clock::now_ms());
        if remaining == 0 || pending.len() > MAX_BEFORE_CONNECT {
            return None;
        }
        let read = monoio::time::timeout(
            Duration::from_millis(remaining),
            shard.buffers.read_ready(&stream, false),
        );
        let Ok(Ok(buf)) = read.await else { return None };
        let eof = buf.is_empty();
        pending.extend_from_slice(&buf);
        shard.buffers.put(buf);
        if eof {
            return None;
        }
    }
}

/// Sends CONNECT_ERROR and a close frame.
async fn refuse_socketio(stream: &Stream, message: &str) {
    let mut out = socketio_frame(&socketio::encode_connect_error(message)).to_vec();
    ws::encode_close(&mut out, protocol::CloseCode::POLICY);
    let _ = stream.write_all(out).await;
}
