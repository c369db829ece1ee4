//! Redis, for several nodes acting as one (SPEC §10): the connections a shard owns (`link`),
//! reading replies (`resp`), the Lua scripts that make each change of a room one atomic step
//! (`scripts`) and the names of a room's keys (`keys`). The `redis` crate encodes the commands and
//! parses the replies; the sockets are this engine's own, driven by the shard's runtime, so no
//! other runtime and no blocking call runs on a shard. What the commands mean for rooms is
//! `broker`'s.

pub(crate) mod keys;
pub(crate) mod link;
pub(crate) mod resp;
pub(crate) mod scripts;

use std::io::{Read, Write};
use std::time::Duration;

use crate::config::RedisSettings;

/// Checks, blocking (at start, before any shard runs), that Redis answers at `settings` with
/// these credentials: connects, authenticates, selects the database and pings. The error names
/// the address and what failed, never the password.
pub fn check(settings: &RedisSettings) -> Result<(), String> {
    let fail = |what: &str| format!("redis at {}: {what}", settings.addr);
    let addrs = std::net::ToSocketAddrs::to_socket_addrs(settings.addr.as_str())
        .map_err(|e| fail(&format!("cannot resolve: {e}")))?;
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
    let mut stream = stream.ok_or_else(|| fail(&format!("cannot connect: {last}")))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
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
    redis::cmd("PING").write_packed_command(&mut out);
    stream
        .write_all(&out)
        .map_err(|e| fail(&format!("cannot write: {e}")))?;
    let mut replies = resp::Replies::default();
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < expected {
        let n = stream
            .read(&mut buf)
            .map_err(|e| fail(&format!("no answer: {e}")))?;
        if n == 0 {
            return Err(fail("closed the connection"));
        }
        replies.feed(&buf[..n]);
        while let Some(value) = replies.next().map_err(|e| fail(&e.to_string()))? {
            got += 1;
            value.extract_error().map_err(|e| fail(&e.to_string()))?;
        }
    }
    Ok(())
}
