//! Redis, for several nodes acting as one (SPEC §10): the connections a shard owns (`link`),
//! reading replies (`resp`), a Redis Cluster's slots (`cluster`), the Lua scripts that make each change of a room one atomic step
//! (`scripts`) and the names of a room's keys (`keys`). The `redis` crate encodes the commands and
//! parses the replies; the sockets are this engine's own, driven by the shard's runtime, so no
//! other runtime and no blocking call runs on a shard. What the commands mean for rooms is
//! `broker`'s.

pub(crate) mod cluster;
pub(crate) mod keys;
pub(crate) mod link;
pub(crate) mod resp;
pub(crate) mod scripts;
pub(crate) mod tls;

use std::io::{Read, Write};
use std::time::Duration;

use crate::config::RedisSettings;

/// Checks, blocking (at start, before any shard runs), that Redis answers with these
/// credentials and is what the settings say: connects, authenticates, selects the database,
/// reads `INFO` (Redis 7.0 or later, for sharded pub/sub; a cluster node exactly when
/// `redis_cluster` is set) and, for a cluster, that its slots are all served. The error names the
/// address and what failed, never the password.
pub fn check(settings: &RedisSettings) -> Result<(), String> {
    let mut last = String::from("no seed node");
    for addr in &settings.seeds {
        match check_one(addr, settings) {
            Ok(()) => return Ok(()),
            // A seed that answers with the wrong kind of server is wrong for all of them.
            Err((false, why)) => return Err(why),
            Err((true, why)) => last = why,
        }
    }
    Err(last)
}

/// A blocking stream, plain or TLS.
trait ReadWrite: Read + Write {}

impl<T: Read + Write> ReadWrite for T {}

/// Checks one server; the error says whether another seed may do better.
fn check_one(addr: &str, settings: &RedisSettings) -> Result<(), (bool, String)> {
    let fail = |what: &str| format!("redis at {addr}: {what}");
    let unreachable = |what: &str| (true, fail(what));
    let wrong = |what: &str| (false, fail(what));
    let addrs = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| unreachable(&format!("cannot resolve: {e}")))?;
    let timeout = Duration::from_secs(3);
    let mut last = String::from("no address");
    let mut stream = None;
    for addr in addrs {
        match std::net::TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let tcp = stream.ok_or_else(|| unreachable(&format!("cannot connect: {last}")))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let mut stream: Box<dyn ReadWrite> = match &settings.tls {
        None => Box::new(tcp),
        Some(config) => {
            let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| wrong(&format!("not a TLS server name: {e}")))?;
            let conn = rustls::ClientConnection::new(config.clone(), name)
                .map_err(|e| wrong(&format!("tls: {e}")))?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    let mut out = Vec::new();
    let mut expected = 1;
    if let Some(password) = &settings.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = &settings.username {
            auth.arg(user);
        }
        auth.arg(password).write_packed_command(&mut out);
        expected += 1;
    }
    if settings.db != 0 {
        redis::cmd("SELECT")
            .arg(settings.db)
            .write_packed_command(&mut out);
        expected += 1;
    }
    redis::cmd("INFO").write_packed_command(&mut out);
    if settings.cluster {
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .write_packed_command(&mut out);
        expected += 1;
    }
    stream
        .write_all(&out)
        .map_err(|e| unreachable(&format!("cannot write: {e}")))?;
    let mut replies = resp::Replies::default();
    let mut buf = [0u8; 4096];
    let mut values = Vec::new();
    while values.len() < expected {
        let n = stream
            .read(&mut buf)
            .map_err(|e| unreachable(&format!("no answer: {e}")))?;
        if n == 0 {
            return Err(unreachable("closed the connection"));
        }
        replies.feed(&buf[..n]);
        while let Some(value) = replies.next().map_err(|e| wrong(&e.to_string()))? {
            values.push(value);
        }
    }
    // Errors in order, except the last for a cluster: `CLUSTER SLOTS` on a server that is not
    // one is told below, in words.
    let checked = expected - usize::from(settings.cluster);
    for value in values.iter_mut().take(checked) {
        let taken = std::mem::replace(value, redis::Value::Nil);
        *value = taken.extract_error().map_err(|e| wrong(&e.to_string()))?;
    }
    let info = values
        .get(expected - 1 - usize::from(settings.cluster))
        .and_then(resp::bytes)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .map(str::to_owned)
    };
    let version = field("redis_version").unwrap_or_default();
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 7 {
        return Err(wrong(&format!(
            "is Redis {version}; ringhub needs Redis 7.0 or later (sharded pub/sub)"
        )));
    }
    let is_cluster = field("cluster_enabled").as_deref() == Some("1");
    if is_cluster && !settings.cluster {
        return Err(wrong(
            "is a Redis Cluster node; set redis_cluster = true and list seed nodes in redis_url",
        ));
    }
    if settings.cluster {
        if !is_cluster {
            return Err(wrong(
                "is not a Redis Cluster node, but redis_cluster = true",
            ));
        }
        let map = values
            .pop()
            .map(|v| v.extract_error().map_err(|e| e.to_string()))
            .unwrap_or_else(|| Err("no answer to CLUSTER SLOTS".into()))
            .and_then(|v| cluster::SlotMap::from_cluster_slots(&v, cluster::host_of(addr)))
            .map_err(|why| wrong(&why))?;
        if !map.covers_all() {
            return Err(unreachable(
                "the cluster does not serve every slot (CLUSTER SLOTS)",
            ));
        }
    }
    Ok(())
}

/// Tells the nodes of the service `message` from a process that runs no engine (the CLI), as a
/// node would (see `crate::announce`): connects to the first seed that answers, authenticates,
/// `SPUBLISH`es on the service channel, and follows one `MOVED` on a cluster. Blocking.
pub fn tell_nodes_blocking(settings: &RedisSettings, message: &[u8]) -> Result<(), String> {
    let channel = format!("{}:{{svc}}:all", settings.prefix);
    let mut payload = b"cli|".to_vec();
    payload.extend_from_slice(message);
    let mut publish = Vec::new();
    redis::cmd("SPUBLISH")
        .arg(&channel)
        .arg(&payload)
        .write_packed_command(&mut publish);
    let mut last = String::from("no seed node");
    let mut targets: Vec<String> = settings.seeds.clone();
    let mut redirected = false;
    while let Some(addr) = (!targets.is_empty()).then(|| targets.remove(0)) {
        match ask_blocking(&addr, settings, &publish) {
            Ok(value) => match value.extract_error() {
                Ok(_) => return Ok(()),
                Err(e) => match e.redirect_node() {
                    Some((to, _)) if !redirected => {
                        redirected = true;
                        targets.insert(0, to.to_owned());
                    }
                    _ => return Err(format!("redis at {addr}: {e}")),
                },
            },
            Err(why) => last = why,
        }
    }
    Err(last)
}

/// Sends one packed command to `addr` after AUTH and SELECT; its reply (an error reply is a
/// value, not an `Err`).
fn ask_blocking(
    addr: &str,
    settings: &RedisSettings,
    command: &[u8],
) -> Result<redis::Value, String> {
    let fail = |what: &str| format!("redis at {addr}: {what}");
    let timeout = Duration::from_secs(3);
    let target = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| fail(&format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| fail("no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| fail(&format!("cannot connect: {e}")))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut out = Vec::new();
    let mut before = 0;
    if let Some(password) = &settings.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = &settings.username {
            auth.arg(user);
        }
        auth.arg(password).write_packed_command(&mut out);
        before += 1;
    }
    if settings.db != 0 {
        redis::cmd("SELECT")
            .arg(settings.db)
            .write_packed_command(&mut out);
        before += 1;
    }
    out.extend_from_slice(command);
    stream
        .write_all(&out)
        .map_err(|e| fail(&format!("cannot write: {e}")))?;
    let mut replies = resp::Replies::default();
    let mut buf = [0u8; 4096];
    let mut seen = 0;
    loop {
        let n = stream
            .read(&mut buf)
            .map_err(|e| fail(&format!("no answer: {e}")))?;
        if n == 0 {
            return Err(fail("closed the connection"));
        }
        replies.feed(&buf[..n]);
        while let Some(value) = replies.next().map_err(|e| fail(&e.to_string()))? {
            if seen == before {
                return Ok(value);
            }
            value.extract_error().map_err(|e| fail(&e.to_string()))?;
            seen += 1;
        }
    }
}
