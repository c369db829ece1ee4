//! The Lua scripts that make each multi-step change of a room in Redis one atomic step (SPEC §10
//! point 9): loaded once per connection, called by SHA. Every key a script touches carries the
//! room's hash tag, so each script runs in one slot. Here are the texts and their hashes only;
//! `keys` names the keys and `broker` calls them.
//!
//! A room's keys (`P` the prefix, `R` the room):
//! - `P:{r:R}:meta`: hash `e` (epoch), `s` (last seq). The epoch is set when missing, so that
//!   losing the room's state in Redis (eviction, an unpersisted restart) always comes with a new
//!   epoch and a gap is never hidden.
//! - `P:{r:R}:hist`: stream of the kept messages, entry id `<seq>-0`, field `d` = the body.
//! - `P:{r:R}:ch`: the shard channel (`SPUBLISH`/`SSUBSCRIBE`, in the room's slot) every node
//!   with members subscribes to: `m|seq|epoch|body`
//!   (a message) and `p|j|user|name` / `p|l|user|name` (a user joined or left, across nodes).
//! - `P:{r:R}:count` hash node → connections there; `P:{r:R}:users` hash user → connections
//!   anywhere; `P:{r:R}:names` hash user → name; `P:{r:R}:nu:<node>` hash user → connections on
//!   that node; `P:{r:R}:leases` sorted set node → lease deadline (ms). A node whose lease has
//!   passed is dead: the first script to see it removes its entries and says its users left.

use std::sync::OnceLock;

/// One script: its text and, computed once, its SHA1.
pub(crate) struct Script {
    /// The Lua text.
    pub(crate) source: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: OnceLock::new(),
        }
    }

    /// The SHA1 Redis knows the script by.
    pub(crate) fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| redis::Script::new(self.source).get_hash().to_owned())
    }

    /// `EVALSHA sha numkeys keys…` ready for its arguments.
    pub(crate) fn call(&self, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.sha()).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd
    }
}

/// Removes the nodes whose lease has passed from a room: their connections, their users (each
/// announced as left when none of its connections is left anywhere).
/// KEYS[1] count, [2] users, [3] names, [4] leases, [5] channel; `nu` is the prefix of the
/// per-node user hashes (`P:{r:R}:nu:`), `now` the time in ms.
macro_rules! purge_text {
    () => {
        r"
local function purge(now, nu, presence_on)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  for _, node in ipairs(dead) do
    local users = redis.call('HGETALL', nu .. node)
    for i = 1, #users, 2 do
      local user, conns = users[i], tonumber(users[i + 1])
      local left = redis.call('HINCRBY', KEYS[2], user, -conns)
      if left <= 0 then
        local name = redis.call('HGET', KEYS[3], user) or ''
        redis.call('HDEL', KEYS[2], user)
        redis.call('HDEL', KEYS[3], user)
        if presence_on == '1' then
          redis.call('SPUBLISH', KEYS[5], 'p|l|' .. user .. '|' .. name)
        end
      end
    end
    redis.call('DEL', nu .. node)
    redis.call('HDEL', KEYS[1], node)
    redis.call('ZREM', KEYS[4], node)
  end
  return #dead
end
local function total()
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do sum = sum + tonumber(v) end
  return sum
end
"
    };
}

/// Publishes a message: the next `seq` (and the epoch, made if missing), the message kept in the
/// stream, then sent on the room's channel — one atomic step, so every node sees the room's
/// messages in `seq` order.
/// KEYS: meta, hist, channel. ARGV: body, max history length, history ttl (ms, 0 = none), meta
/// ttl (s), a new epoch (used if the room has none), then `publish_per_room` counted over every
/// node as GCRA in the meta's field `r`: [6] ms per publish (0 = off), [7] burst, [8] now ms.
/// Returns `{seq, epoch}`, or `{-1, retry after ms}` past the room's rate (nothing published).
pub(crate) static PUBLISH: Script = Script::new(
    r"
local per = tonumber(ARGV[6])
if per > 0 then
  local now = tonumber(ARGV[8])
  local tat = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
  if tat < now then tat = now end
  local nxt = tat + per
  local room = per * tonumber(ARGV[7])
  if nxt - now > room then return {-1, math.ceil(nxt - now - room)} end
  redis.call('HSET', KEYS[1], 'r', tostring(nxt))
end
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[5]
  redis.call('HSET', KEYS[1], 'e', e)
end
local s = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  if s == 1 then redis.call('DEL', KEYS[2]) end
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], s .. '-0', 'd', ARGV[1])
  if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
end
redis.call('SPUBLISH', KEYS[3], 'm|' .. s .. '|' .. e .. '|' .. ARGV[1])
return {s, e}
",
);

/// Counts a connection into a room across nodes: dead nodes purged, `max_members` checked on
/// every node's connections, this node's lease renewed, the user announced as joined when it is
/// its first connection anywhere; answers what a join needs.
/// KEYS: count, users, names, leases, channel, meta, hist.
/// ARGV: [1] node, [2] user, [3] name, [4] max members (0 = none), [5] now ms, [6] lease ms,
/// [7] presence on, [8] nu prefix, [9] new epoch, [10] meta ttl (s), [11] want presence,
/// [12] resume from seq (-1 = no resume), [13] most messages to recover, [14] count the
/// connection (`0` when it is already counted: a resume of a room it holds).
/// Returns `{1, epoch, seq, presence, recovered}` or `{0, members}` when the room is full;
/// `presence` is a flat list user, conns, name…; `recovered` the stream entries after the resume
/// seq (`{}` when not resuming).
pub(crate) static JOIN: Script = Script::new(JOIN_SOURCE);

/// Counts a connection out of a room; the user is announced as left with its last connection.
/// KEYS: count, users, names, leases, channel. ARGV: [1] node, [2] user, [3] now ms, [4] presence
/// on, [5] nu prefix. Returns the connections left in the room.
pub(crate) static LEAVE: Script = Script::new(LEAVE_SOURCE);

/// Who is in a room across nodes (dead nodes purged first).
/// KEYS: count, users, names, leases, channel. ARGV: [1] now ms, [2] presence on, [3] nu prefix.
/// Returns a flat list user, conns, name…
pub(crate) static PRESENCE: Script = Script::new(PRESENCE_SOURCE);

/// Renews this node's lease in a room and purges dead nodes (every node with members does this
/// periodically, so a dead node's users are announced as left within its lease).
/// KEYS: count, users, names, leases, channel. ARGV: [1] node, [2] now ms, [3] lease ms,
/// [4] presence on, [5] nu prefix. Returns the nodes purged.
pub(crate) static TOUCH: Script = Script::new(TOUCH_SOURCE);

/// A room's history after a seq. KEYS: meta, hist. ARGV: [1] after seq, [2] most entries,
/// [3] a new epoch, [4] meta ttl (s). Returns `{epoch, last seq, entries}`.
pub(crate) static HISTORY: Script = Script::new(
    r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[3]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
local s = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
return {e, s, entries}
",
);

/// Re-announces this node's connections in a room after Redis came back (its entries may be gone
/// with a restart): sets this node's counts to what it holds. KEYS: count, users, names, leases,
/// channel. ARGV: [1] node, [2] now ms, [3] lease ms, [4] presence on, [5] nu prefix, then
/// user, conns, name triples.
pub(crate) static ANNOUNCE: Script = Script::new(ANNOUNCE_SOURCE);

const JOIN_SOURCE: &str = concat!(
    purge_text!(),
    r"
purge(ARGV[5], ARGV[8], ARGV[7])
local node, user = ARGV[1], ARGV[2]
if ARGV[14] == '1' then
  local max = tonumber(ARGV[4])
  if max > 0 then
    local members = total()
    if members >= max then return {0, members} end
  end
  redis.call('HINCRBY', KEYS[1], node, 1)
  redis.call('HINCRBY', ARGV[8] .. node, user, 1)
  local conns = redis.call('HINCRBY', KEYS[2], user, 1)
  redis.call('HSET', KEYS[3], user, ARGV[3])
  if conns == 1 and ARGV[7] == '1' then
    redis.call('SPUBLISH', KEYS[5], 'p|j|' .. user .. '|' .. ARGV[3])
  end
end
redis.call('ZADD', KEYS[4], tonumber(ARGV[5]) + tonumber(ARGV[6]), node)
local e = redis.call('HGET', KEYS[6], 'e')
if not e then
  e = ARGV[9]
  redis.call('HSET', KEYS[6], 'e', e)
  redis.call('EXPIRE', KEYS[6], ARGV[10])
end
local s = tonumber(redis.call('HGET', KEYS[6], 's') or '0')
local presence = {}
if ARGV[11] == '1' then
  local users = redis.call('HGETALL', KEYS[2])
  for i = 1, #users, 2 do
    presence[#presence + 1] = users[i]
    presence[#presence + 1] = users[i + 1]
    presence[#presence + 1] = redis.call('HGET', KEYS[3], users[i]) or ''
  end
end
local recovered = {}
if tonumber(ARGV[12]) >= 0 then
  recovered = redis.call('XRANGE', KEYS[7], '(' .. ARGV[12] .. '-0', '+', 'COUNT', ARGV[13])
end
return {1, e, s, presence, recovered}
"
);

const LEAVE_SOURCE: &str = concat!(
    purge_text!(),
    r"
purge(ARGV[3], ARGV[5], ARGV[4])
local node, user = ARGV[1], ARGV[2]
local here = redis.call('HINCRBY', KEYS[1], node, -1)
if here <= 0 then redis.call('HDEL', KEYS[1], node) end
local mine = redis.call('HINCRBY', ARGV[5] .. node, user, -1)
if mine <= 0 then redis.call('HDEL', ARGV[5] .. node, user) end
local conns = redis.call('HINCRBY', KEYS[2], user, -1)
if conns <= 0 then
  local name = redis.call('HGET', KEYS[3], user) or ''
  redis.call('HDEL', KEYS[2], user)
  redis.call('HDEL', KEYS[3], user)
  if ARGV[4] == '1' then
    redis.call('SPUBLISH', KEYS[5], 'p|l|' .. user .. '|' .. name)
  end
end
return total()
"
);

const PRESENCE_SOURCE: &str = concat!(
    purge_text!(),
    r"
purge(ARGV[1], ARGV[3], ARGV[2])
local out = {}
local users = redis.call('HGETALL', KEYS[2])
for i = 1, #users, 2 do
  out[#out + 1] = users[i]
  out[#out + 1] = users[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[3], users[i]) or ''
end
return out
"
);

const TOUCH_SOURCE: &str = concat!(
    purge_text!(),
    r"
local purged = purge(ARGV[2], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return purged
"
);

const ANNOUNCE_SOURCE: &str = concat!(
    purge_text!(),
    r"
purge(ARGV[2], ARGV[5], ARGV[4])
local node = ARGV[1]
local mine = ARGV[5] .. node
local before = redis.call('HGETALL', mine)
for i = 1, #before, 2 do
  local left = redis.call('HINCRBY', KEYS[2], before[i], -tonumber(before[i + 1]))
  if left <= 0 then redis.call('HDEL', KEYS[2], before[i]) end
end
redis.call('DEL', mine)
local here = 0
for i = 6, #ARGV, 3 do
  local user, conns, name = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  here = here + conns
  redis.call('HINCRBY', mine, user, conns)
  local total_conns = redis.call('HINCRBY', KEYS[2], user, conns)
  redis.call('HSET', KEYS[3], user, name)
  if total_conns == conns and ARGV[4] == '1' then
    redis.call('SPUBLISH', KEYS[5], 'p|j|' .. user .. '|' .. name)
  end
end
if here > 0 then
  redis.call('HSET', KEYS[1], node, here)
  redis.call('ZADD', KEYS[4], tonumber(ARGV[2]) + tonumber(ARGV[3]), node)
else
  redis.call('HDEL', KEYS[1], node)
  redis.call('ZREM', KEYS[4], node)
end
return here
"
);

/// Counts a new connection of a user across nodes (SPEC §10 point 4): connections of dead nodes
/// are dropped first; at `max_connections_per_user` the oldest is given up (`close_oldest`,
/// answered so that its node closes it with 4509) or the new one refused (`reject_new`). KEYS:
/// the user's connections (a sorted set of `node|conn` by connect time). ARGV: [1] `node|conn`,
/// [2] now ms, [3] max, [4] `close` or `reject`, [5] the set's ttl ms, [6] a grace in ms, then
/// the live nodes as the caller last read them from the registry. A connection is dead when its
/// node is not among them and it is older than the grace (a node started since the caller's
/// last look keeps its connections). The registry itself is not read here: it is in another slot
/// of a Redis Cluster. Returns `{1}`, `{1, oldest}` or `{0}` (refused).
pub(crate) static ADMIT: Script = Script::new(
    r"
local now = tonumber(ARGV[2])
local live = {}
for i = 7, #ARGV do live[ARGV[i]] = true end
local young = now - tonumber(ARGV[6])
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', young, 'BYSCORE')) do
  local node = string.match(member, '^(.*)|[^|]*$')
  if not (node and live[node]) then redis.call('ZREM', KEYS[1], member) end
end
local oldest = nil
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  if ARGV[4] ~= 'close' then return {0} end
  oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  redis.call('ZREM', KEYS[1], oldest)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if oldest then return {1, oldest} end
return {1}
",
);

/// Renews this node's lease in the node registry, forgets dead nodes, lists the live ones.
/// KEYS: the registry. ARGV: [1] node, [2] now ms, [3] lease ms. Returns the live nodes.
pub(crate) static REGISTER: Script = Script::new(
    r"
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
return redis.call('ZRANGE', KEYS[1], 0, -1)
",
);

/// A token bucket shared by every node (SPEC §9 with Redis), as GCRA: the key holds the
/// bucket's theoretical arrival time. KEYS: the bucket. ARGV: [1] now ms, [2] ms per token,
/// [3] capacity (the burst). Returns `{1}` (taken) or `{0, retry after ms}`.
pub(crate) static LIMIT: Script = Script::new(
    r"
local now = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next = tat + per
if next - now > per * burst then
  return {0, math.ceil(next - now - per * burst)}
end
redis.call('SET', KEYS[1], tostring(next), 'PX', math.max(1, math.ceil(next - now)))
return {1}
",
);

/// Failed logins of one account shared by every node, and the lockout they trigger. KEYS: the
/// account's hash (`n` failures, `s` window start, `l` locked until). ARGV: [1] `check`, `fail`
/// or `ok`, [2] now ms, [3] window ms, [4] failures that lock, [5] lockout ms. Returns `{1}` or
/// `{0, retry after ms}` (locked; for `fail`, locked by this failure or before).
pub(crate) static FAILURES: Script = Script::new(
    r"
local now = tonumber(ARGV[2])
if ARGV[1] == 'ok' then redis.call('DEL', KEYS[1]) return {1} end
local locked = tonumber(redis.call('HGET', KEYS[1], 'l') or '0')
if locked > now then return {0, locked - now} end
if ARGV[1] == 'check' then return {1} end
local window = tonumber(ARGV[3])
local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local n = 0
if now - start < window then n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0') else start = now end
n = n + 1
local lockout = tonumber(ARGV[5])
if n >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'n', 0, 's', now, 'l', now + lockout)
  redis.call('PEXPIRE', KEYS[1], math.max(1, lockout))
  return {0, lockout}
end
redis.call('HSET', KEYS[1], 'n', n, 's', start)
redis.call('PEXPIRE', KEYS[1], math.max(1, window))
return {1}
",
);

/// Caches a user's sealed record unless the entry was dropped after the record was read.
/// KEYS: the entry (hash `v` the sealed value, `t` when it was last dropped, in ms). ARGV: [1]
/// the value, [2] when it was read (ms), [3] ttl ms. Returns 1 (cached) or 0 (a newer change).
pub(crate) static CACHE_PUT: Script = Script::new(
    r"
local dropped = tonumber(redis.call('HGET', KEYS[1], 't') or '-1')
if dropped >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
);

/// Drops a cached record and leaves the time of the change. KEYS: the entry. ARGV: [1] now ms,
/// [2] ttl ms. Returns 1.
pub(crate) static CACHE_DROP: Script = Script::new(
    r"
redis.call('HDEL', KEYS[1], 'v')
local dropped = tonumber(redis.call('HGET', KEYS[1], 't') or '-1')
if tonumber(ARGV[1]) > dropped then redis.call('HSET', KEYS[1], 't', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
);

/// Holds a session created while the database is unreachable. KEYS: the held sessions' hash
/// (`s:<id>` the sealed record, `c:<id>` its current token hash, `r:<token hash>` the id).
/// ARGV: [1] id, [2] token hash, [3] record, [4] most sessions held. Returns 1, or 0 when full.
pub(crate) static SESSION_HOLD: Script = Script::new(
    r"
if redis.call('HLEN', KEYS[1]) >= 3 * tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], 's:' .. ARGV[1], ARGV[3], 'c:' .. ARGV[1], ARGV[2], 'r:' .. ARGV[2], ARGV[1])
return 1
",
);

/// The held session of a refresh token. KEYS: the held sessions. ARGV: [1] token hash. Returns
/// `{id, current token hash, record}` or an empty array.
pub(crate) static SESSION_FIND: Script = Script::new(
    r"
local id = redis.call('HGET', KEYS[1], 'r:' .. ARGV[1])
if not id then return {} end
local current = redis.call('HGET', KEYS[1], 'c:' .. id)
local record = redis.call('HGET', KEYS[1], 's:' .. id)
if not (current and record) then return {} end
return {id, current, record}
",
);

/// Rotates a held session's refresh token if the presented one is still current. KEYS: the held
/// sessions. ARGV: [1] id, [2] presented hash, [3] new hash, [4] new record. Returns 1 or 0.
pub(crate) static SESSION_ROTATE: Script = Script::new(
    r"
if redis.call('HGET', KEYS[1], 'c:' .. ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'r:' .. ARGV[2])
redis.call('HSET', KEYS[1], 'c:' .. ARGV[1], ARGV[3], 'r:' .. ARGV[3], ARGV[1], 's:' .. ARGV[1], ARGV[4])
return 1
",
);

/// Up to ARGV[1] held sessions as a flat `{id, token hash, record, …}`. KEYS: the held
/// sessions.
pub(crate) static SESSIONS_HELD: Script = Script::new(
    r"
local out = {}
local limit = tonumber(ARGV[1])
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'MATCH', 's:*', 'COUNT', 100)
  cursor = page[1]
  for i = 1, #page[2], 2 do
    local id = string.sub(page[2][i], 3)
    local current = redis.call('HGET', KEYS[1], 'c:' .. id)
    if current and #out < 3 * limit then
      out[#out + 1] = id
      out[#out + 1] = current
      out[#out + 1] = page[2][i + 1]
    end
  end
until cursor == '0' or #out >= 3 * limit
return out
",
);

/// Forgets a held session written back, if the token written is still its current one. KEYS:
/// the held sessions. ARGV: [1] id, [2] token hash. Returns 1, or 0 (rotated since).
pub(crate) static SESSION_RELEASE: Script = Script::new(
    r"
if redis.call('HGET', KEYS[1], 'c:' .. ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 's:' .. ARGV[1], 'c:' .. ARGV[1], 'r:' .. ARGV[2])
return 1
",
);

/// Every script, loaded on each command connection.
pub(crate) static ALL: [&Script; 18] = [
    &PUBLISH,
    &JOIN,
    &LEAVE,
    &PRESENCE,
    &TOUCH,
    &HISTORY,
    &ANNOUNCE,
    &ADMIT,
    &REGISTER,
    &LIMIT,
    &FAILURES,
    &CACHE_PUT,
    &CACHE_DROP,
    &SESSION_HOLD,
    &SESSION_FIND,
    &SESSION_ROTATE,
    &SESSIONS_HELD,
    &SESSION_RELEASE,
];
