#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, clippy (-D warnings), the build of the real
# binary, every test of the workspace (unit, property, fuzz-corpus replay, black-box), and a
# compile check of the fuzz targets. Installs what it needs when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs); this machine has none" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    step "installing the $component component"
    rustup component add "$component"
  fi
done

step "TLS test tools (curl, openssl)"
if ! command -v curl >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq curl openssl
fi

step "third-party test clients (python-socketio, socket.io-client)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq nodejs npm
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3-pip
fi
if ! python3 -c "import socketio, websocket" >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
fi
if [ ! -d tests/clients/node_modules/socket.io-client ]; then
  (cd tests/clients && npm install --no-audit --no-fund --no-package-lock --silent)
fi

step "PostgreSQL on 127.0.0.1:5432 (the accounts and storage tests run against it)"
pg_up() { python3 -c 'import socket; socket.create_connection(("127.0.0.1", 5432), 1).close()' 2>/dev/null; }
if [ -z "${RINGHUB_TEST_DATABASE_URL:-}" ] && ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq postgresql
  fi
  (service postgresql start || pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start) >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
fi

step "Redis on 127.0.0.1:6379 (the several-nodes tests share it; failure tests start their own)"
redis_up() { python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 6379), 1); s.sendall(b"PING\r\n"); assert s.recv(16).startswith(b"+PONG")' 2>/dev/null; }
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  # redis-cli (redis-tools) builds the local Redis Cluster of the cluster tests.
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools
fi
if ! redis_up; then
  redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 1 30); do redis_up && break; sleep 0.2; done
  redis_up || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "the engine's module graph has no cycle"
python3 scripts/module-graph.py --root engine/src

step "cargo clippy (workspace, all targets, -D warnings)"
cargo clippy --workspace --all-targets -j "$jobs" -- -D warnings

step "cargo build -p ringhub (the binary the black-box tests run)"
cargo build -p ringhub -j "$jobs"

step "fuzz targets compile (stable; coverage flags only in fuzz/run.sh)"
cargo build --manifest-path fuzz/Cargo.toml -j "$jobs"

step "cargo test --workspace"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace -j "$jobs" -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

step "the black-box suite again, every server on Redis (the shared broker; the several-nodes tests already chose theirs)"
set +e
RINGHUB_TEST_REDIS=redis://127.0.0.1:6379 cargo test -p ringhub-tests -j "$jobs" -- --test-threads="${TEST_THREADS:-4}" --skip nodes:: --skip nodes_accounts:: 2>&1 | tee -a "$log"
redis_status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ]; then status=$redis_status; fi
# One closing line over every test binary (cargo prints one per binary, the last often a doc-test
# run with 0 tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"
exit "$status"
