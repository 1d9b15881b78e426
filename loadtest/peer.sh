#!/usr/bin/env bash
# portcullis against Limitador (Kuadrant's Envoy RLS server, in Rust: the closest peer), side by
# side in one run, for the RLS cases of issue 16: the same ShouldRateLimit call to each, each
# server pinned to core 0, the load generator to core 1 (and redis-server with it, so each
# server has a core of its own), alternated round by round, median of the rounds.
#
#   LIMITADOR_BIN=/path/to/limitador-server loadtest/peer.sh [rounds, default 3]
#
# Limitador is not on crates.io as a binary: build limitador-server from its repository
# (github.com/Kuadrant/limitador; `cargo build --release -p limitador-server`). This script is a
# manual benchmark, not part of scripts/test.sh: CI has no Limitador.
#
# Both servers get the same limits: the bench domain's k0 (never refuses) and `limited` (100 an
# hour), as loadtest/bench/ratelimit/bench.yaml has them; each runs on its defaults otherwise
# (Limitador: the `memory` or `redis` storage, log level error; portcullis: the bench policy,
# the memory store or Redis with pool_size 4, log level info). The h2load rows send one body
# (one hot key); the portcullis-loadtest rows spread 10,000 keys and check every outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${LIMITADOR_BIN:?set LIMITADOR_BIN to a limitador-server binary (see the comment at the top)}"
rounds="${1:-3}"
dur=5s
command -v h2load >/dev/null 2>&1 || { echo "peer.sh: h2load is missing (apt-get install nghttp2-client)" >&2; exit 1; }
command -v redis-server >/dev/null 2>&1 || { echo "peer.sh: redis-server is missing" >&2; exit 1; }
cargo build --quiet --release -p decision -p loadtest --bins
bin=target/release
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
server=(taskset -c 0); client=(taskset -c 1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port
  for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "peer.sh: nothing listens on port $1" >&2; return 1
}

cat > "$work/limits.yaml" <<'EOF'
- namespace: bench
  max_value: 1000000000
  seconds: 1
  conditions: []
  variables: ["descriptors[0]['k0']"]
- namespace: bench
  max_value: 100
  seconds: 3600
  conditions: []
  variables: ["descriptors[0]['limited']"]
EOF

start_peer() { # storage args...
  peer_port="$(free_port)"
  "${server[@]}" "$peer" --rls-ip 127.0.0.1 --rls-port "$peer_port" --http-ip 127.0.0.1 --http-port "$(free_port)" \
    "$work/limits.yaml" "$@" > "$work/peer.log" 2>&1 &
  peer_pid=$!; pids+=("$peer_pid")
  wait_port "$peer_port"
}
start_portcullis() { # policy-file (in $work, beside a copy of the bench's ratelimit/ and jwks.json)
  local port; port="$(free_port)"
  sed -i -e "s|grpc: 127.0.0.1:0|grpc: 127.0.0.1:$port|" "$1"
  grep -q "grpc: 127.0.0.1:$port" "$1" || { echo "peer.sh: the bench policy's listen line moved" >&2; exit 1; }
  "${server[@]}" "$bin/portcullis" serve --config "$1" --log-format json > /dev/null 2> "$work/pc.log" &
  pc_pid=$!; pids+=("$pc_pid")
  pc_port="$port"
  wait_port "$pc_port"
}
# stops these processes and forgets them, so cleanup never signals a pid the system has reused
stop() {
  kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true
  local keep=() p q gone
  for p in "${pids[@]}"; do
    gone=""; for q in "$@"; do [ "$p" = "$q" ] && gone=1; done
    [ -z "$gone" ] && keep+=("$p")
  done
  pids=("${keep[@]}")
}

out="$work/rows.jsonl"
hz="$(getconf CLK_TCK)"
ticks() { # a process's user + system CPU, in 1/$hz s; a process gone ends the run, saying so
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || { echo "peer.sh: process $1 exited during a run" >&2; exit 1; }
}
pid_of() { if [ "$1" = limitador ]; then echo "$peer_pid"; else echo "$pc_pid"; fi; }
# the server's CPU per request (and redis-server's, when one runs): its CPU over 2.5 s in the
# middle of the run, against the run's req/s
h2() { # case server port body-file conns streams
  local report pid s0 s1 r0=0 r1=0
  pid="$(pid_of "$2")"
  "${client[@]}" h2load -c "$5" -m "$6" -D "$dur" --warm-up-time=1s \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$4" \
    "http://127.0.0.1:$3/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" > "$work/h2.out" 2>&1 &
  local h=$!
  sleep 2; s0="$(ticks "$pid")"; [ -n "${redis_pid:-}" ] && r0="$(ticks "$redis_pid")"
  sleep 2.5; s1="$(ticks "$pid")"; [ -n "${redis_pid:-}" ] && r1="$(ticks "$redis_pid")"
  wait "$h" || { echo "peer.sh: h2load ($1, $2) failed:" >&2; cat "$work/h2.out" >&2; exit 1; }
  report="$(cat "$work/h2.out")"
  python3 - "$1" "$2" "$report" "$((s1 - s0))" "$((r1 - r0))" "$hz" >> "$out" <<'PY'
import json, re, sys
case, server, text, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[6])
rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text).group(1))
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
if not req or int(req.group(5)) or int(req.group(6)) or not re.search(r"status codes: [1-9]\d* 2xx", text):
    sys.exit(f"peer.sh: h2load ({case}, {server}): failures, errors or no 2xx:\n{text}")
us = lambda t: int(t) / hz / 2.5 / rps * 1e6 if rps else None
print(json.dumps({"case": case, "server": server, "rps": rps, "server_us": us(sys.argv[4]),
                  "redis_us": us(sys.argv[5]) if int(sys.argv[5]) else None}))
PY
}
lt() { # case server port extra-args...
  local c="$1" s="$2" p="$3" store=(); shift 3
  [ -n "${redis_pid:-}" ] && store=(--store-pid "$redis_pid")
  "${client[@]}" "$bin/portcullis-loadtest" --json --target rls --addr "127.0.0.1:$p" --connections 4 --streams 8 --duration "$dur" \
    --server-pid "$(pid_of "$s")" "${store[@]}" "$@" \
    | python3 -c '
import json, sys
r = json.load(sys.stdin)
us = lambda pct: pct / 100 / r["rps"] * 1e6 if pct is not None and r["rps"] else None
print(json.dumps({"case": sys.argv[1], "server": sys.argv[2], "rps": r["rps"], "server_us": us(r.get("server_cpu_pct")),
                  "redis_us": us(r.get("store_cpu_pct"))}))' "$c" "$s" >> "$out"
}
body() { "$bin/portcullis-loadtest" --addr unused --write-request "$@"; }
body "$work/ok.bin" --target rls
body "$work/limited.bin" --target rls --descriptor-key limited

# Both servers apply the same limits: each allows exactly 100 of 300 `limited` requests (the
# load generator checks every answer), so neither answers OK without counting.
check_limits() {
  local s port
  for s in limitador portcullis; do
    port="$peer_port"
    if [ "$s" = portcullis ]; then port="$pc_port"; fi
    "${client[@]}" "$bin/portcullis-loadtest" --target rls --addr "127.0.0.1:$port" --requests 300 --connections 1 \
      --streams 4 --descriptor-key limited --expect 100 > /dev/null \
      || { echo "peer.sh: $s did not allow exactly 100 of 300 requests over a limit of 100" >&2; exit 1; }
  done
}

# each case: both servers, alternated, `rounds` times
both() { # case runner args-after-port...
  local c="$1" run="$2"; shift 2
  for _ in $(seq 1 "$rounds"); do
    "$run" "$c" limitador "$peer_port" "$@"
    "$run" "$c" portcullis "$pc_port" "$@"
  done
}

echo "peer.sh: $rounds rounds of $dur per case and server, servers on core 0, load generator (and redis-server) on core 1" >&2
# memory
start_peer memory
mkdir -p "$work/ratelimit"
cp loadtest/bench/ratelimit/bench.yaml "$work/ratelimit/"
cp loadtest/bench/jwks.json "$work/"
cp loadtest/bench/policy.yaml "$work/policy-memory.yaml"
start_portcullis "$work/policy-memory.yaml"
check_limits
both "memory, one hot key, 4x8 (h2load)" h2 "$work/ok.bin" 4 8
both "memory, 10,000 keys, 4x8 (portcullis-loadtest)" lt --keys 10000 --expect all
both "memory, over the limit, 4x8 (h2load)" h2 "$work/limited.bin" 4 8
stop "$peer_pid" "$pc_pid"

# Redis: one redis-server, on the load generator's core, that both servers use in turn on the load generator's core for each server
redis_port="$(free_port)"
"${client[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" > /dev/null &
redis_pid=$!; pids+=("$redis_pid")
wait_port "$redis_port"
start_peer redis "redis://127.0.0.1:$redis_port"
sed -e "s|^  memory: {}|  redis: { url: \"redis://127.0.0.1:$redis_port\", timeout: 1s, pool_size: 4 }|" \
  loadtest/bench/policy.yaml > "$work/policy-redis.yaml"
grep -q "redis: { url" "$work/policy-redis.yaml" || { echo "peer.sh: the bench policy's store line moved" >&2; exit 1; }
start_portcullis "$work/policy-redis.yaml"
check_limits
both "Redis, one hot key, 4x8 (h2load)" h2 "$work/ok.bin" 4 8
both "Redis, 10,000 keys, 4x8 (portcullis-loadtest)" lt --keys 10000 --expect all
both "Redis, one hot key, 16x16 (h2load)" h2 "$work/ok.bin" 16 16
both "Redis, over the limit, 4x8 (h2load)" h2 "$work/limited.bin" 4 8
stop "$peer_pid" "$pc_pid" "$redis_pid"

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = list(dict.fromkeys(r["case"] for r in rows))
med = lambda c, s, k: statistics.median([r[k] for r in rows if r["case"] == c and r["server"] == s and r.get(k) is not None] or [float("nan")])
print("| case | Limitador req/s | portcullis req/s | throughput, portcullis / Limitador | server CPU per request, Limitador / portcullis (us) | redis-server CPU per request, Limitador / portcullis (us) | rounds, req/s (Limitador; portcullis) |")
print("|---|---|---|---|---|---|---|")
for c in cases:
    lim = [r["rps"] for r in rows if r["case"] == c and r["server"] == "limitador"]
    pc = [r["rps"] for r in rows if r["case"] == c and r["server"] == "portcullis"]
    ml, mp = statistics.median(lim), statistics.median(pc)
    fmt = lambda xs: " / ".join(f"{x:.0f}" for x in xs)
    cpu = f'{med(c, "limitador", "server_us"):.1f} / {med(c, "portcullis", "server_us"):.1f}'
    rcpu = f'{med(c, "limitador", "redis_us"):.1f} / {med(c, "portcullis", "redis_us"):.1f}' if c.startswith("Redis") else "-"
    print(f"| {c} | {ml:.0f} | {mp:.0f} | {mp / ml:.2f} | {cpu} | {rcpu} | {fmt(lim)}; {fmt(pc)} |")
print("\n(medians of the rounds; CPU per request is each process's CPU time over the run, or over 2.5 s in its middle for h2load, divided by the requests answered)")
PY
