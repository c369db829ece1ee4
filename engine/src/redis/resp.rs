//! Replies read from a Redis connection: bytes go in as the socket gives them, complete RESP
//! values come out, through the `redis` crate's parser (which keeps a partial value across
//! reads). Also the few readings of a value the engine needs. No socket, no state but the parser.

use std::io::{self, Read};

use redis::{ErrorKind, RedisError, Value};

/// Turns received bytes into complete values.
pub(crate) struct Replies {
    parser: redis::Parser,
    inbox: Inbox,
}

/// Bytes received and not yet pulled by the parser. It reads "would block" when empty, never
/// end-of-file: the parser treats end-of-file as final and could not resume a partial value.
#[derive(Default)]
struct Inbox {
    data: Vec<u8>,
    pos: usize,
}

impl Read for Inbox {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = &self.data[self.pos..];
        if available.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.pos += n;
        if self.pos == self.data.len() {
            self.data.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Default for Replies {
    fn default() -> Self {
        Self {
            parser: redis::Parser::new(),
            inbox: Inbox::default(),
        }
    }
}

impl Replies {
    /// Adds bytes read from the connection.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.inbox.data.extend_from_slice(bytes);
    }

    /// The next complete value; `Ok(None)` when more bytes are needed; `Err` when the stream is
    /// not RESP (the connection must be dropped). An error reply is a value (`ServerError`).
    pub(crate) fn next(&mut self) -> Result<Option<Value>, RedisError> {
        match self.parser.parse_value(&mut self.inbox) {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.is_timeout() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The integer of a reply (`Int`, or a number sent as a string).
pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// The bytes of a string reply.
pub(crate) fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The items of an array reply (`Nil` reads as empty).
pub(crate) fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// Whether `e` is Redis saying it does not know a script's SHA (its script cache was flushed).
pub(crate) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// A message of a subscribed connection: `(channel, payload)` of a `message`; `None` for the
/// confirmations of `subscribe` and `unsubscribe` and anything else.
pub(crate) fn message(value: &Value) -> Option<(&[u8], &[u8])> {
    let parts = match value {
        Value::Array(items) => &items[..],
        Value::Push {
            kind: redis::PushKind::Message | redis::PushKind::SMessage,
            data,
        } => {
            return match &data[..] {
                [channel, payload] => Some((bytes(channel)?, bytes(payload)?)),
                _ => None,
            };
        }
        _ => return None,
    };
    match parts {
        [kind, channel, payload] if matches!(bytes(kind), Some(b"message" | b"smessage")) => {
            Some((bytes(channel)?, bytes(payload)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_out_whole_however_the_bytes_are_cut() {
        let wire = b"+OK\r\n:42\r\n$5\r\nhello\r\n*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nabc\r\n-ERR nope\r\n";
        for cut in 1..wire.len() {
            let mut replies = Replies::default();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                replies.feed(chunk);
                while let Some(v) = replies.next().unwrap() {
                    out.push(v);
                }
            }
            assert_eq!(out.len(), 5, "cut {cut}");
            assert_eq!(out[0], Value::Okay);
            assert_eq!(int(&out[1]), Some(42));
            assert_eq!(bytes(&out[2]), Some(&b"hello"[..]));
            assert_eq!(message(&out[3]), Some((&b"ch"[..], &b"abc"[..])));
            assert!(out[4].clone().extract_error().is_err());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_wait() {
        let mut replies = Replies::default();
        replies.feed(b"?what\r\n");
        assert!(replies.next().is_err());
    }

    #[test]
    fn noscript_is_recognised() {
        let e = redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n")
            .unwrap()
            .extract_error()
            .unwrap_err();
        assert!(is_noscript(&e));
    }
}
