#!/usr/bin/env python3
"""Revocation propagation across two nodes (docs/performance.md): two `ringhub serve` on one
PostgreSQL schema (revprop, recreated) and the local Redis; per round a login on node A, a
WebSocket on node B, a logout on A; it reports when B closed the connection (4001), after the
logout's 204 and after its request. Usage: revocation-propagation.py BINARY ROUNDS. Needs
psql and websocket-client (tests/clients/requirements.txt). Bounded: ROUNDS rounds, 5 s per wait."""
import json, subprocess, sys, time, os, socket, urllib.request, statistics
import websocket
BIN, N = sys.argv[1], int(sys.argv[2])
import tempfile
WORK = tempfile.mkdtemp(prefix="revprop-")
PG = "postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3Drevprop"
subprocess.run(["psql","-h","127.0.0.1","-U","postgres","test","-qc","DROP SCHEMA IF EXISTS revprop CASCADE; CREATE SCHEMA revprop"],check=True)
common = ["--database-url",PG,"--redis-url","redis://127.0.0.1:6379","--redis-prefix","revprop%d"%os.getpid(),
  "--jwt-secret","revprop-shared-secret-0123456789abcdefgh","--encryption-key","AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
  "--blind-index-key","revprop-shared-secret-0123456789abcdefgh","--bcrypt-cost","4","--shards","1",
  "--rate-limits.login-per-ip","100000/1s","--rate-limits.connect-per-ip","100000/1s","--token-binding","none"]
procs, ports = [], []
for i in range(2):
    d = os.path.join(WORK, "n%d" % i)
    log = open(os.path.join(WORK, "n%d.log" % i), "w")
    p = subprocess.Popen([BIN,"serve","--listen","127.0.0.1:0","--data-dir",d,"--node-id","n%d"%i]+common, stdout=log, stderr=subprocess.DEVNULL)
    line = ""
    for _ in range(200):
        time.sleep(0.05)
        lines = [l for l in open(os.path.join(WORK, "n%d.log" % i)) if '"listening"' in l]
        if lines: line = lines[0]; break
    ports.append(int(json.loads(line)["addr"].rsplit(":",1)[1])); procs.append(p)
def api(port, method, path, body=None, token=None):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method, data=json.dumps(body).encode() if body else None)
    req.add_header("Content-Type","application/json")
    if token: req.add_header("Authorization","Bearer "+token)
    try:
        with urllib.request.urlopen(req, timeout=5) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()
time.sleep(1)
print(api(ports[0],"POST","/register",{"username":"revprop","email":"rp@example.com","password":"correct horse"})[0])
after, total = [], []
for rnd in range(N):
    s, b = api(ports[0],"POST","/login",{"email":"rp@example.com","password":"correct horse"})
    assert s == 200, (s, b)
    token = json.loads(b)["access_token"]
    ws = websocket.create_connection("ws://127.0.0.1:%d/ws?token=%s" % (ports[1], token), subprotocols=["ringhub.v1.json"], timeout=5)
    ws.recv()  # welcome
    t0 = time.perf_counter(); s, _ = api(ports[0],"POST","/logout",token=token); t1 = time.perf_counter()
    assert s == 204, s
    try:
        while True:
            op, data = ws.recv_data(control_frame=True)
            if op == websocket.ABNF.OPCODE_CLOSE: break
    except Exception: pass
    t2 = time.perf_counter()
    code = int.from_bytes(data[:2],"big") if op == 8 else None
    assert code == 4001, code
    after.append((t2-t1)*1000); total.append((t2-t0)*1000)
    ws.close()
for p in procs: p.terminate()
q = lambda xs, f: sorted(xs)[min(len(xs)-1, int(f*len(xs)))]
print(json.dumps({"rounds":N,"close_after_204_ms_p50":round(q(after,.5),2),"p99":round(q(after,.99),2),"max":round(max(after),2),
 "close_after_request_ms_p50":round(q(total,.5),2),"p99_total":round(q(total,.99),2)}))
