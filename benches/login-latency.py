#!/usr/bin/env python3
"""Login latency served from PostgreSQL vs from the encrypted user cache (docs/performance.md).
One `ringhub serve` (one shard) on a PostgreSQL schema (loginlat, recreated) reached through a
TCP relay this script runs, and a redis-server of its own on a free port. N accounts log in
once through PostgreSQL (timed), then the relay is cut, the breaker opens, and each logs in
again from the cache (timed; the session is held in Redis); the relay is restored and the
held sessions must all reach PostgreSQL. Usage: login-latency.py BINARY N [BCRYPT_COST].
Needs psql and redis-server. Bounded: N logins per phase, 5 s per request, 20 s per wait."""
import json, os, socket, subprocess, sys, tempfile, threading, time, urllib.request

BIN, N = sys.argv[1], int(sys.argv[2])
COST = sys.argv[3] if len(sys.argv) > 3 else "4"
WORK = tempfile.mkdtemp(prefix="loginlat-")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Relay:
    def __init__(self, target):
        self.target, self.cut, self.live = target, False, []
        self.sock = socket.socket(); self.sock.bind(("127.0.0.1", 0)); self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            if self.cut: c.close(); continue
            s = socket.create_connection(self.target)
            self.live += [c, s]
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    def pipe(self, a, b):
        try:
            while (d := a.recv(65536)):
                b.sendall(d)
        except OSError:
            pass
        try: b.shutdown(socket.SHUT_RDWR)
        except OSError: pass

    def set_cut(self, cut):
        self.cut = cut
        if cut:
            for s in self.live:
                try: s.shutdown(socket.SHUT_RDWR)
                except OSError: pass
            self.live = []


subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "test", "-qc",
                "DROP SCHEMA IF EXISTS loginlat CASCADE; CREATE SCHEMA loginlat"], check=True)
redis_port = free_port()
redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL)
relay = Relay(("127.0.0.1", 5432))
PG = "postgres://postgres@127.0.0.1:%d/test?options=-csearch_path%%3Dloginlat" % relay.port
log_path = os.path.join(WORK, "node.log")
time.sleep(0.3)
node = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(WORK, "d"),
                         "--database-url", PG, "--redis-url", "redis://127.0.0.1:%d" % redis_port,
                         "--bcrypt-cost", COST, "--shards", "1", "--breaker-failures", "3",
                         "--breaker-probe", "500ms", "--rate-limits.login-per-ip", "100000/1s",
                         "--rate-limits.register-per-ip", "100000/1s", "--token-binding", "none"],
                        stdout=open(log_path, "w"), stderr=subprocess.DEVNULL)
port = None
for _ in range(200):
    time.sleep(0.05)
    lines = [l for l in open(log_path) if '"listening"' in l]
    if lines:
        port = int(json.loads(lines[0])["addr"].rsplit(":", 1)[1]); break


def api(method, path, body=None):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method,
                                 data=json.dumps(body).encode() if body else None)
    req.add_header("Content-Type", "application/json")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=5) as r: status, data = r.status, r.read()
    except urllib.error.HTTPError as e: status, data = e.code, e.read()
    return status, data, (time.perf_counter() - t0) * 1000


def login(i):
    return api("POST", "/login", {"email": "u%d@example.com" % i, "password": "correct horse"})


try:
    for i in range(N):
        s, b, _ = api("POST", "/register", {"username": "user%d" % i, "email": "u%d@example.com" % i,
                                             "password": "correct horse"})
        assert s == 201, (s, b)
    pg = []
    for i in range(N):
        s, b, ms = login(i); assert s == 200, (s, b); pg.append(ms)
    relay.set_cut(True)
    deadline = time.time() + 20
    while b'ringhub_breaker_state{dependency="postgres"} 2' not in api("GET", "/metrics")[1]:
        api("POST", "/register", {"username": "xxx", "email": "x@example.com", "password": "correct horse"})
        assert time.time() < deadline, "the breaker never opened"
        time.sleep(0.05)
    cache = []
    for i in range(N):
        s, b, ms = login(i); assert s == 200, (s, b); cache.append(ms)
    relay.set_cut(False)
    held, deadline = 0, time.time() + 20
    while True:
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "test", "-tAc",
                              "SELECT COUNT(*) FROM loginlat.sessions"], capture_output=True, text=True)
        held = int(out.stdout.strip() or 0)
        if held == 2 * N or time.time() > deadline: break
        time.sleep(0.25)
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))]
    print(json.dumps({"logins": N, "bcrypt_cost": int(COST),
                      "postgres_ms_p50": round(q(pg, .5), 2), "postgres_ms_p99": round(q(pg, .99), 2),
                      "cache_ms_p50": round(q(cache, .5), 2), "cache_ms_p99": round(q(cache, .99), 2),
                      "sessions_in_postgres_after": held, "expected": 2 * N}))
finally:
    node.terminate(); redis.terminate()
