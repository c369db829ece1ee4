//! One connection to Redis, owned by a shard and driven by its runtime (SPEC §10 point 9): the
//! commands queued while the shard runs go out together in one write when the shard next yields,
//! and replies are handed, in order, to the handler queued with each command. A subscriber
//! connection hands every value to the owner instead. It connects (AUTH, SELECT, the scripts
//! loaded once), reconnects with backoff and jitter capped at 5 s, and declares itself down when
//! Redis stops answering. While it is down, [`Link::send`] refuses at once, so that no caller
//! waits on it. It knows nothing of what the commands mean.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use redis::{Cmd, RedisError, Value};

use super::resp::{Replies, is_noscript};
use super::scripts::Script;
use super::tls::Secure;
use crate::clock::monotonic_ms32;
use crate::config::RedisSettings;

/// A reply that does not come within this long means Redis is unreachable.
const REPLY_TIMEOUT_MS: u32 = 3000;
/// Connecting and the first replies must take less than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Commands, each with its reply.
    Commands,
    /// `SUBSCRIBE`/`UNSUBSCRIBE`; what arrives goes to the owner as it comes.
    Subscriber,
}

/// What the owner of a link is told.
pub(crate) trait LinkEvents<P> {
    /// The reply to the command queued with `handler` (an error reply is `Err`).
    fn reply(&mut self, handler: P, reply: Result<Value, RedisError>);
    /// A value on a subscriber connection.
    fn push(&mut self, value: Value);
    /// The link is up (again): what must be announced or subscribed again goes now.
    fn up(&mut self);
    /// The link went down; `unanswered` will never get their replies.
    fn down(&mut self, unanswered: Vec<P>);
    /// Commands and writes, for the metrics.
    fn wrote(&mut self, commands: usize);
    /// A reply came after this many microseconds (for the round-trip metric), sampled.
    fn round_trip(&mut self, micros: u64);
}

struct Inner<P> {
    up: bool,
    out: Vec<u8>,
    /// Commands in `out`.
    queued: usize,
    pending: VecDeque<(P, u32)>,
}

/// One connection's queue of commands and handlers.
pub(crate) struct Link<P> {
    role: Role,
    inner: RefCell<Inner<P>>,
    writer: RefCell<Option<Waker>>,
    /// Set to drop the connection (a script cache flushed under us, an owner's request).
    reset: Cell<bool>,
    /// Commands written since the reading side last told the owner.
    written: Cell<usize>,
    /// Set when the owner no longer needs this connection (a master left the cluster): it is
    /// closed and not made again.
    retired: Cell<bool>,
}

impl<P> Link<P> {
    pub(crate) fn new(role: Role) -> Self {
        Self {
            role,
            inner: RefCell::new(Inner {
                up: false,
                out: Vec::new(),
                queued: 0,
                pending: VecDeque::new(),
            }),
            writer: RefCell::new(None),
            reset: Cell::new(false),
            written: Cell::new(0),
            retired: Cell::new(false),
        }
    }

    /// Closes the connection for good: what is in flight is told `down`, nothing reconnects.
    pub(crate) fn retire(&self) {
        self.retired.set(true);
        self.reset.set(true);
        if let Some(waker) = self.writer.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Queues a command already encoded (a redirected one); its reply goes to `handler`.
    pub(crate) fn send_packed(&self, packed: &[u8], handler: P) -> Result<(), P> {
        let mut inner = self.inner.borrow_mut();
        if !inner.up {
            return Err(handler);
        }
        inner.out.extend_from_slice(packed);
        inner.queued += 1;
        if self.role == Role::Commands {
            inner.pending.push_back((handler, monotonic_ms32()));
        }
        drop(inner);
        if let Some(waker) = self.writer.borrow_mut().take() {
            waker.wake();
        }
        Ok(())
    }

    /// Whether commands can be sent.
    pub(crate) fn is_up(&self) -> bool {
        self.inner.borrow().up
    }

    /// Queues `cmd`; its reply goes to `handler`. Refused at once while the link is down (the
    /// handler comes back).
    pub(crate) fn send(&self, cmd: &Cmd, handler: P) -> Result<(), P> {
        let mut inner = self.inner.borrow_mut();
        if !inner.up {
            return Err(handler);
        }
        cmd.write_packed_command(&mut inner.out);
        inner.queued += 1;
        if self.role == Role::Commands {
            inner.pending.push_back((handler, monotonic_ms32()));
        }
        drop(inner);
        if let Some(waker) = self.writer.borrow_mut().take() {
            waker.wake();
        }
        Ok(())
    }

    fn take_out(&self, spare: Vec<u8>) -> (Vec<u8>, usize) {
        let mut inner = self.inner.borrow_mut();
        let commands = std::mem::take(&mut inner.queued);
        (std::mem::replace(&mut inner.out, spare), commands)
    }

    fn stalled(&self) -> bool {
        let inner = self.inner.borrow();
        inner
            .pending
            .front()
            .is_some_and(|(_, at)| monotonic_ms32().wrapping_sub(*at) > REPLY_TIMEOUT_MS)
    }
}

/// Resolves when the link has something to write.
struct Work<'a, P>(&'a Link<P>);

impl<P> Future for Work<'_, P> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.inner.borrow().out.is_empty() {
            return Poll::Ready(());
        }
        *self.0.writer.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    Io(std::io::Error),
    Protocol(String),
    Refused(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Protocol(why) => write!(f, "protocol: {why}"),
            Self::Refused(why) => write!(f, "{why}"),
        }
    }
}

impl From<std::io::Error> for Ended {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Keeps `link` connected to `addr` until it is retired: connects, hands the owner its events,
/// reconnects.
pub(crate) async fn drive<P>(
    link: Rc<Link<P>>,
    addr: Rc<str>,
    settings: Rc<RedisSettings>,
    scripts: &'static [&'static Script],
    mut events: impl LinkEvents<P>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut jitter = Jitter::new();
    let mut failures = 0u32;
    while !link.retired.get() {
        let connected = monoio::time::timeout(
            CONNECT_TIMEOUT,
            connect(&addr, &settings, scripts, link.role),
        )
        .await;
        if link.retired.get() {
            return;
        }
        match connected {
            Ok(Ok((stream, secure, replies))) => {
                backoff = Duration::from_millis(100);
                if failures > 0 {
                    tracing::info!(addr = %addr, role = ?link.role, "redis connected again");
                }
                failures = 0;
                link.reset.set(false);
                link.inner.borrow_mut().up = true;
                events.up();
                let ended = run(&link, stream, secure, replies, &mut events).await;
                let unanswered: Vec<P> = {
                    let mut inner = link.inner.borrow_mut();
                    inner.up = false;
                    inner.out.clear();
                    inner.queued = 0;
                    inner.pending.drain(..).map(|(p, _)| p).collect()
                };
                if !link.retired.get() {
                    tracing::warn!(addr = %addr, role = ?link.role, error = %ended, "redis connection lost");
                }
                events.down(unanswered);
                if link.retired.get() {
                    return;
                }
            }
            Ok(Err(e)) => {
                if failures == 0 {
                    tracing::warn!(addr = %addr, role = ?link.role, error = %e, "cannot connect to redis");
                }
                failures += 1;
            }
            Err(_) => {
                if failures == 0 {
                    tracing::warn!(addr = %addr, role = ?link.role, "redis did not answer in time");
                }
                failures += 1;
            }
        }
        monoio::time::sleep(jitter.around(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects and prepares a connection: AUTH, SELECT, and (for commands) every script loaded.
async fn connect(
    addr: &str,
    settings: &RedisSettings,
    scripts: &[&Script],
    role: Role,
) -> Result<(TcpStream, Option<Secure>, Replies), Ended> {
    let mut stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let secure = match &settings.tls {
        Some(config) => Some(Secure::handshake(&mut stream, config.clone(), addr).await?),
        None => None,
    };
    let mut hello = Vec::new();
    let mut expected = 0;
    if let Some(password) = &settings.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = &settings.username {
            auth.arg(user);
        }
        auth.arg(password).write_packed_command(&mut hello);
        expected += 1;
    }
    if settings.db != 0 {
        redis::cmd("SELECT")
            .arg(settings.db)
            .write_packed_command(&mut hello);
        expected += 1;
    }
    if role == Role::Commands {
        for script in scripts {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script.source)
                .write_packed_command(&mut hello);
            expected += 1;
        }
    }
    redis::cmd("PING").write_packed_command(&mut hello);
    expected += 1;
    if let Some(secure) = &secure {
        hello = secure.seal(&hello)?;
    }
    let (result, _) = stream.write_all(hello).await;
    result?;
    let mut replies = Replies::default();
    let mut buf = Vec::with_capacity(4096);
    let mut plain = Vec::new();
    let mut got = 0;
    while got < expected {
        let (result, b) = stream.read(buf).await;
        buf = b;
        if result? == 0 {
            return Err(Ended::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        match &secure {
            Some(secure) => {
                secure.open(&buf, &mut plain)?;
                replies.feed(&plain);
                plain.clear();
            }
            None => replies.feed(&buf),
        }
        buf.clear();
        while let Some(value) = replies.next().map_err(|e| Ended::Protocol(e.to_string()))? {
            got += 1;
            if let Err(e) = value.extract_error() {
                return Err(Ended::Refused(e.to_string()));
            }
        }
    }
    Ok((stream, secure, replies))
}

/// Runs one connection until it fails or stalls.
async fn run<P>(
    link: &Link<P>,
    stream: TcpStream,
    secure: Option<Secure>,
    replies: Replies,
    events: &mut impl LinkEvents<P>,
) -> Ended {
    let (mut reader, mut writer) = stream.into_split();
    let write = async {
        let mut spare = Vec::with_capacity(4096);
        loop {
            Work(link).await;
            let (buf, commands) = link.take_out(spare);
            let buf = match &secure {
                Some(secure) => match secure.seal(&buf) {
                    Ok(records) => records,
                    Err(e) => return Ended::Io(e),
                },
                None => buf,
            };
            let (result, mut buf) = writer.write_all(buf).await;
            if let Err(e) = result {
                return Ended::Io(e);
            }
            buf.clear();
            spare = buf;
            // Told to the owner by the reading side, which holds the events.
            link.written.set(link.written.get() + commands);
        }
    };
    let read = async {
        let mut replies = replies;
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut plain = Vec::new();
        loop {
            let (result, b) = reader.read(buf).await;
            buf = b;
            match result {
                Ok(0) => return Ended::Io(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) => return Ended::Io(e),
            }
            match &secure {
                Some(secure) => {
                    if let Err(e) = secure.open(&buf, &mut plain) {
                        return Ended::Io(e);
                    }
                    replies.feed(&plain);
                    plain.clear();
                }
                None => replies.feed(&buf),
            }
            buf.clear();
            let written = link.written.replace(0);
            if written > 0 {
                events.wrote(written);
            }
            loop {
                let value = match replies.next() {
                    Ok(Some(v)) => v,
                    Ok(None) => break,
                    Err(e) => return Ended::Protocol(e.to_string()),
                };
                if link.role == Role::Subscriber {
                    events.push(value);
                    continue;
                }
                let Some((handler, sent_at)) = link.inner.borrow_mut().pending.pop_front() else {
                    return Ended::Protocol("a reply nobody asked for".into());
                };
                let reply = value.extract_error();
                if let Err(e) = &reply
                    && is_noscript(e)
                {
                    // The script cache was flushed: reconnecting loads every script again.
                    link.reset.set(true);
                }
                if sent_at & 0x3f == 0 {
                    let micros = u64::from(monotonic_ms32().wrapping_sub(sent_at)) * 1000;
                    events.round_trip(micros);
                }
                events.reply(handler, reply);
            }
            if link.reset.get() {
                return Ended::Refused("script cache flushed; reloading".into());
            }
        }
    };
    let watchdog = async {
        loop {
            monoio::time::sleep(Duration::from_millis(250)).await;
            if link.stalled() {
                return Ended::Refused(format!("no reply within {REPLY_TIMEOUT_MS} ms"));
            }
            if link.reset.get() {
                return Ended::Refused("reset".into());
            }
        }
    };
    monoio::select! {
        ended = write => ended,
        ended = read => ended,
        ended = watchdog => ended,
    }
}

/// A small random spread of waits, so that nodes do not reconnect in step.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = crate::clock::monotonic_us() ^ u64::from(std::process::id()).rotate_left(32);
        Self(seed | 1)
    }

    /// `base`, give or take a quarter.
    fn around(&mut self, base: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let quarter = base.as_micros() / 4;
        let spread = u128::from(self.0) % (2 * quarter + 1);
        let micros = base.as_micros() - quarter + spread;
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }
}
