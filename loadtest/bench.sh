#!/usr/bin/env bash
# The benchmark matrix, side by side in one run, as ratios against a no-op gRPC server built in
# this workspace (portcullis-noop: same gRPC stack, answers OK without work). It starts and stops
# everything itself; the server side is pinned to core 0 and the load generator to core 1
# (taskset) when the machine has two cores or more.
#
#   loadtest/bench.sh            # short mode (under 2 minutes), release build
#   loadtest/bench.sh --full     # longer runs, 1,000,000 keys for the memory figure
#   loadtest/bench.sh --smoke    # seconds, debug build: checks the harness, not the speed
#                                #   (scripts/test.sh runs this)
#
# Every case checks its outcomes against what loadtest/bench/policy.yaml predicts; a mismatch or
# any error fails the run. Results: a markdown table on stdout, JSON lines in $BENCH_OUT
# (default target/bench/results.jsonl).
#
# To compare two builds back to back, copy one build's target/release/portcullis aside and run
# with PORTCULLIS_BIN=/that/copy: that binary is measured instead of this tree's (the load
# generator and the no-op server still come from this tree).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:---short}"
case "$mode" in
  --smoke) profile=debug;   dur=1s;  conns=2; streams=4; mem_keys=2000 ;;
  --short) profile=release; dur=8s;  conns=4; streams=8; mem_keys=100000 ;;
  --full)  profile=release; dur=30s; conns=4; streams=8; mem_keys=1000000 ;;
  *) echo "usage: loadtest/bench.sh [--smoke|--short|--full]" >&2; exit 2 ;;
esac

if [ "$profile" = release ]; then
  cargo build --quiet --release -p decision -p loadtest -p gateway-shim --bins
else
  cargo build --quiet -p decision -p loadtest -p gateway-shim --bins
fi
bin="target/$profile"
portcullis="${PORTCULLIS_BIN:-$bin/portcullis}"
out="${BENCH_OUT:-target/bench/results.jsonl}"
mkdir -p "$(dirname "$out")"
: > "$out"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

server_cpu=(); client_cpu=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0); client_cpu=(taskset -c 1)
  pinning="server on core 0, load generator on core 1 (taskset)"
else
  pinning="not pinned (taskset missing or one core)"
fi

wait_for() { # file pattern
  for _ in $(seq 1 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "bench.sh: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; return 1
}

# portcullis on the bench policy; decision logs stay on (they are part of the product) but go to
# /dev/null, keeping only the line that says where it listens. Sets pc_pid and pc_addr.
start_portcullis() {
  rm -f "$work/portcullis.listen"
  "${server_cpu[@]}" "$portcullis" serve --config loadtest/bench/policy.yaml --log-format json \
    2> >(grep --line-buffered -m1 '"listening"' > "$work/portcullis.listen"; cat > /dev/null) &
  pc_pid=$!; pids+=("$pc_pid")
  wait_for "$work/portcullis.listen" listening
  pc_addr="$(sed -E 's/.*"grpc_addr":"([^"]+)".*/\1/' "$work/portcullis.listen")"
}

# portcullis on the bench policy plus an audit trail (a file sink, fsync once a second) and
# traffic control (a concurrency slot per request): what a production policy pays for them. The
# load generator sends no completions, so each slot is held until its lease lapses (5 s): a few
# hundred thousand held at once, under a limit set high enough never to refuse.
# Sets pcf_pid, pcf_addr and pcf_http.
start_portcullis_full() {
  mkdir -p "$work/ratelimit" && cp loadtest/bench/ratelimit/bench.yaml "$work/ratelimit/" && cp loadtest/bench/jwks.json "$work/"
  { cat loadtest/bench/policy.yaml
    printf 'audit:\n  sinks:\n    - file: { path: "%s/audit.log", fsync: interval }\n  spill_dir: "%s/spill"\n' "$work" "$work"
    printf 'traffic:\n  concurrency_limit: 10000000\n  queue_size: 0\n  lease_ttl: 5s\n'
  } > "$work/policy-full.yaml"
  rm -f "$work/portcullis-full.listen"
  "${server_cpu[@]}" "$portcullis" serve --config "$work/policy-full.yaml" --log-format json \
    2> >(grep --line-buffered -m1 '"listening"' > "$work/portcullis-full.listen"; cat > /dev/null) &
  pcf_pid=$!; pids+=("$pcf_pid")
  wait_for "$work/portcullis-full.listen" listening
  pcf_addr="$(sed -E 's/.*"grpc_addr":"([^"]+)".*/\1/' "$work/portcullis-full.listen")"
  pcf_http="$(sed -E 's/.*"http_addr":"([^"]+)".*/\1/' "$work/portcullis-full.listen")"
}

# portcullis on the bench policy with its forward-auth listener on, trusting the load generator
# (loopback) as a proxy, as nginx or Traefik would be. Sets pcfa_pid and pcfa_addr.
start_portcullis_forward_auth() {
  mkdir -p "$work/ratelimit" && cp loadtest/bench/ratelimit/bench.yaml "$work/ratelimit/" && cp loadtest/bench/jwks.json "$work/"
  sed -e 's|^network:$|network:\n  trusted_proxies: [127.0.0.0/8]|' loadtest/bench/policy.yaml > "$work/policy-fa.yaml"
  rm -f "$work/portcullis-fa.listen"
  "${server_cpu[@]}" "$portcullis" serve --config "$work/policy-fa.yaml" --forward-auth-addr 127.0.0.1:0 --log-format json \
    2> >(grep --line-buffered -m1 '"listening"' > "$work/portcullis-fa.listen"; cat > /dev/null) &
  pcfa_pid=$!; pids+=("$pcfa_pid")
  wait_for "$work/portcullis-fa.listen" listening
  pcfa_addr="$(sed -E 's/.*"forward_auth_addr":"([^"]+)".*/\1/' "$work/portcullis-fa.listen")"
}

# portcullis on the same policy with the Redis store (a redis-server of its own). Sets
# pcr_pid and pcr_addr.
start_portcullis_redis() {
  redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  "${server_cpu[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" > /dev/null &
  redis_pid=$!; pids+=("$redis_pid")
  for _ in $(seq 1 100); do redis-cli -p "$redis_port" PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  sed -e "s|^  memory: {}|  redis: { url: \"redis://127.0.0.1:$redis_port\", timeout: 1s, pool_size: 4 }|" \
    loadtest/bench/policy.yaml > "$work/policy-redis.yaml"
  # 100,000 API keys kept in the store (as the admin API's CreateKey writes them), read by
  # portcullis when it starts: pk_bench_store_<i>, tier open, role user
  python3 - <<'PY' | redis-cli -p "$redis_port" --pipe > /dev/null
import hashlib, json, sys
out = sys.stdout
for i in range(100000):
    rec = json.dumps({"roles": ["user"], "tier": "open", "created": 0,
                      "values": [{"sha256": hashlib.sha256(f"pk_bench_store_{i}".encode()).hexdigest()}]},
                     separators=(",", ":"))
    args = ["HSET", "pc:{keys}", f"bench-store-{i}", rec]
    out.write(f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args))
PY
  mkdir -p "$work/ratelimit" && cp loadtest/bench/ratelimit/bench.yaml "$work/ratelimit/" && cp loadtest/bench/jwks.json "$work/"
  rm -f "$work/portcullis-redis.listen"
  "${server_cpu[@]}" "$portcullis" serve --config "$work/policy-redis.yaml" --log-format json \
    2> >(grep --line-buffered -m1 '"listening"' > "$work/portcullis-redis.listen"; cat > /dev/null) &
  pcr_pid=$!; pids+=("$pcr_pid")
  wait_for "$work/portcullis-redis.listen" listening
  pcr_addr="$(sed -E 's/.*"grpc_addr":"([^"]+)".*/\1/' "$work/portcullis-redis.listen")"
}

"${server_cpu[@]}" "$bin/portcullis-noop" --addr 127.0.0.1:0 --http-addr 127.0.0.1:0 > "$work/noop.out" &
noop_pid=$!; pids+=("$noop_pid")
wait_for "$work/noop.out" listening
noop_addr="$(awk '/listening/ {print $2}' "$work/noop.out")"
upstream_addr="$(awk '/^http / {print $2}' "$work/noop.out")"

# Envoy: $PORTCULLIS_ENVOY, the virtualenv scripts/test.sh installs, or PATH
envoy_bin="${PORTCULLIS_ENVOY:-}"
[ -z "$envoy_bin" ] && [ -x "${PORTCULLIS_VENV:-$HOME/.cache/portcullis/venv}/bin/envoy" ] && envoy_bin="${PORTCULLIS_VENV:-$HOME/.cache/portcullis/venv}/bin/envoy"
[ -z "$envoy_bin" ] && envoy_bin="$(command -v envoy || true)"
[ -n "$envoy_bin" ] || { echo "bench.sh: no envoy binary (scripts/test.sh installs one; or set PORTCULLIS_ENVOY)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Envoy on `config` (ports filled in), one worker, on the servers' core. Sets envoy_addr.
start_envoy() { # name config-file
  local listen admin
  listen="$(free_port)"; admin="$(free_port)"
  sed -e "s/port_value: 10000/port_value: $listen/; s/LISTEN_PORT/$listen/" \
      -e "s/port_value: 9901/port_value: $admin/; s/ADMIN_PORT/$admin/" \
      -e "s/port_value: 8080/port_value: ${upstream_addr##*:}/; s/UPSTREAM_PORT/${upstream_addr##*:}/" \
      -e "s/port_value: 8081/port_value: ${pc_addr##*:}/" "$2" > "$work/envoy-$1.yaml"
  "${server_cpu[@]}" "$envoy_bin" -c "$work/envoy-$1.yaml" --concurrency 1 --disable-hot-restart -l error \
    > "$work/envoy-$1.log" 2>&1 &
  envoy_pid=$!; pids+=("$envoy_pid")
  python3 - "$admin" <<'PY' || { echo "bench.sh: envoy ($1) did not become ready:" >&2; cat "$work/envoy-$1.log" >&2; exit 1; }
import sys, time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
  envoy_addr="127.0.0.1:$listen"
}

# A certificate for the HTTPS cases (Envoy and the shim serve the same one), and a copy of an
# Envoy config whose listener terminates TLS with it (TLS 1.2+, ALPN h2 and http/1.1, as the
# shim). Writes $2.
mkdir -p "$work/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>/dev/null
tls_envoy() { # source-config output
  python3 - "$1" "$work/tls" > "$2" <<'PY'
import sys
text, tls = open(sys.argv[1]).read(), sys.argv[2]
block = f"""        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              common_tls_context:
                tls_params: {{ tls_minimum_protocol_version: TLSv1_2 }}
                alpn_protocols: [h2, http/1.1]
                tls_certificates:
                  - certificate_chain: {{ filename: {tls}/cert.pem }}
                    private_key: {{ filename: {tls}/key.pem }}
          filters:"""
assert text.count("        - filters:") == 1, "the listener's filter chain moved"
print(text.replace("        - filters:", block, 1), end="")
PY
}

# portcullis-shim on the same certificate, asking `$2` (portcullis, or portcullis-noop), in
# front of the no-op upstream; with `ratelimit` as the example Envoy route when $3 is set.
# Sets shim_pid and shim_addr.
start_shim() { # name decision-addr [ratelimit]
  local rl=""
  [ -n "${3:-}" ] && rl=", ratelimit: { domain: edge }"
  printf 'listen: { https: 127.0.0.1:0 }\ntls: { cert_file: %s/cert.pem, key_file: %s/key.pem }\nportcullis: { address: "http://%s"%s }\nupstream: { url: "http://%s" }\n' \
    "$work/tls" "$work/tls" "$2" "$rl" "$upstream_addr" > "$work/shim-$1.yaml"
  rm -f "$work/shim-$1.listen"
  "${server_cpu[@]}" "$bin/portcullis-shim" serve --config "$work/shim-$1.yaml" --log-format json --log warn,gateway_shim::server=info \
    2> >(grep --line-buffered -m1 'portcullis-shim listening' > "$work/shim-$1.listen"; cat > /dev/null) &
  shim_pid=$!; pids+=("$shim_pid")
  wait_for "$work/shim-$1.listen" listening
  shim_addr="$(sed -E 's/.*"https":"([^"]+)".*/\1/' "$work/shim-$1.listen")"
}

lt() { "${client_cpu[@]}" "$bin/portcullis-loadtest" --json "$@" >> "$out"; }
common=(--connections "$conns" --streams "$streams" --duration "$dur")

echo "bench.sh $mode: $profile build, $dur a case, ${conns}x${streams} (connections x streams), $pinning" >&2
# memory first, on a fresh process: one new RLS key per request (a day-long window, so none
# expires), resident memory growth per key
start_portcullis
lt --name memory-per-key          --target rls --addr "$pc_addr" --server-pid "$pc_pid" --connections "$conns" --streams "$streams" --requests "$mem_keys" --keys "$mem_keys" --sequential-keys --descriptor-key mem --expect all
kill "$pc_pid"; wait "$pc_pid" 2>/dev/null || true
start_portcullis
lt --name noop-ext-authz          --target ext-authz --addr "$noop_addr" --server-pid "$noop_pid" "${common[@]}"
lt --name ext-authz-api-key       --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --api-key pk_bench_open --expect all
lt --name ext-authz-jwt           --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --jwt-key tests/fixtures/jwt/rsa.pem --expect all
lt --name ext-authz-mix            --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --scenario loadtest/bench/scenario.yaml --jwt-key tests/fixtures/jwt/rsa.pem --expect all
lt --name ext-authz-100k-ips      --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --api-key pk_bench_open --keys 100000 --expect all
lt --name noop-native             --target native --addr "$noop_addr" --server-pid "$noop_pid" "${common[@]}"
lt --name native-api-key          --target native --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --api-key pk_bench_open --expect all
# forward-auth (Traefik's and Caddy's way of asking, over HTTP/1.1) against a no-op HTTP server
# answering the same requests
lt --name noop-forward-auth       --target forward-auth --addr "$upstream_addr" --server-pid "$noop_pid" "${common[@]}"
start_portcullis_forward_auth
lt --name forward-auth-api-key    --target forward-auth --addr "$pcfa_addr" --server-pid "$pcfa_pid" "${common[@]}" --api-key pk_bench_open --expect all
kill "$pcfa_pid"; wait "$pcfa_pid" 2>/dev/null || true
lt --name noop-rls-1              --target rls --addr "$noop_addr" --server-pid "$noop_pid" "${common[@]}"
lt --name rls-1-desc-1-key        --target rls --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --expect all
lt --name rls-1-desc-100k-keys    --target rls --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --keys 100000 --expect all
lt --name noop-rls-5              --target rls --addr "$noop_addr" --server-pid "$noop_pid" "${common[@]}" --descriptors 5
lt --name rls-5-desc-1-key        --target rls --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --descriptors 5 --expect all
# HTTP end to end: what a request pays through Envoy with portcullis (ext_authz, ratelimit and
# the access log, as deploy/examples/envoy.yaml sets them up) against Envoy alone
start_envoy direct loadtest/bench/envoy-direct.yaml
lt --name http-envoy-direct        --target http --addr "$envoy_addr" --server-pid "$envoy_pid" "${common[@]}" --path /api/v1/bench --expect all
start_envoy portcullis deploy/examples/envoy.yaml
lt --name http-envoy-portcullis    --target http --addr "$envoy_addr" --server-pid "$pc_pid" "${common[@]}" --path /api/v1/bench --api-key pk_bench_open --expect all
kill "$envoy_pid"; wait "$envoy_pid" 2>/dev/null || true
# the same Envoy with the ratelimit filter alone (no ext_authz, no access log): what the call a
# plain RLS deployment makes costs, beside the whole set above
python3 - deploy/examples/envoy.yaml > "$work/envoy-rls-only.src.yaml" <<'PY'
import sys
text = open(sys.argv[1]).read()
def cut(text, start, end):
    a, b = text.index(start), text.index(end)
    assert a < b, (start, end)
    return text[:a] + text[b:]
text = cut(text, "                access_log:\n", "                # Defence in depth")
text = cut(text, "                  - name: envoy.filters.http.ext_authz\n", "                  - name: envoy.filters.http.ratelimit\n")
assert "ext_authz" not in text.split("http_filters:")[1] and "access_log" not in text
print(text, end="")
PY
start_envoy rls-only "$work/envoy-rls-only.src.yaml"
lt --name http-envoy-rls-only      --target http --addr "$envoy_addr" --server-pid "$pc_pid" "${common[@]}" --path /api/v1/bench --api-key pk_bench_open --expect all
kill "$envoy_pid"; wait "$envoy_pid" 2>/dev/null || true
# HTTPS end to end, Envoy against portcullis-shim: the same certificate, upstream, policy and
# pinning, HTTP/1.1 over TLS from the load generator. The direct pair: Envoy alone, and the shim
# asking portcullis-noop (the shim always asks; the no-op answer is the cheapest there is). Then
# each asking portcullis (ext_authz, ratelimit, completions) as deploy/examples/envoy.yaml does.
tls_envoy loadtest/bench/envoy-direct.yaml "$work/envoy-direct-tls.src.yaml"
start_envoy direct-tls "$work/envoy-direct-tls.src.yaml"
lt --name https-envoy-direct       --target http --ca-file "$work/tls/cert.pem" --addr "$envoy_addr" --server-pid "$envoy_pid" "${common[@]}" --path /api/v1/bench --expect all
kill "$envoy_pid"; wait "$envoy_pid" 2>/dev/null || true
start_shim direct "$noop_addr"
lt --name http-shim-direct         --target http --ca-file "$work/tls/cert.pem" --addr "$shim_addr" --server-pid "$shim_pid" "${common[@]}" --path /api/v1/bench --expect all
kill "$shim_pid"; wait "$shim_pid" 2>/dev/null || true
tls_envoy deploy/examples/envoy.yaml "$work/envoy-portcullis-tls.src.yaml"
start_envoy portcullis-tls "$work/envoy-portcullis-tls.src.yaml"
lt --name https-envoy-portcullis   --target http --ca-file "$work/tls/cert.pem" --addr "$envoy_addr" --server-pid "$pc_pid" "${common[@]}" --path /api/v1/bench --api-key pk_bench_open --expect all
kill "$envoy_pid"; wait "$envoy_pid" 2>/dev/null || true
start_shim portcullis "$pc_addr" ratelimit
lt --name http-shim-portcullis     --target http --ca-file "$work/tls/cert.pem" --addr "$shim_addr" --server-pid "$pc_pid" "${common[@]}" --path /api/v1/bench --api-key pk_bench_open --expect all
kill "$shim_pid"; wait "$shim_pid" 2>/dev/null || true
# the same, with an audit trail and a concurrency slot per request; then how many audit events
# were written and dropped under that load (the target is zero dropped)
start_portcullis_full
lt --name ext-authz-audit-traffic --target ext-authz --addr "$pcf_addr" --server-pid "$pcf_pid" "${common[@]}" --api-key pk_bench_open --expect all
python3 - "$pcf_http" > "$out.audit" <<'PY'
import sys, urllib.request
m = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode()
val = lambda name: next((int(float(l.split()[-1])) for l in m.splitlines() if l.startswith(name + " ")), 0)
print(f"audit under load: {val('portcullis_audit_events_total')} events sealed, {val('portcullis_audit_spilled_total')} spilled, {val('portcullis_audit_dropped_total')} dropped")
PY
kill "$pcf_pid"; wait "$pcf_pid" 2>/dev/null || true
# correctness under load: exactly what the policy allows, the rest over the limit
lt --name ext-authz-limited       --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --api-key pk_bench_limited --expect 100
lt --name rls-limited             --target rls --addr "$pc_addr" --server-pid "$pc_pid" "${common[@]}" --descriptor-key limited --expect 100
# The RLS and ext_authz cases again from h2load (nghttp2's HTTP/2 load generator, a C client much
# cheaper than ours, pinned the same way) sending the same call (the bodies are written by
# portcullis-loadtest --write-request), so that these ratios do not depend on our load
# generator's own cost. h2load sees HTTP statuses only (gRPC's status is in
# the trailers): these rows measure throughput; the rows above check outcomes.
command -v h2load >/dev/null 2>&1 \
  || { echo "bench.sh: h2load is missing (Debian: apt-get install nghttp2-client; scripts/test.sh installs it)" >&2; exit 1; }
h2() { # name addr body-file [gRPC method path, default RLS ShouldRateLimit]
  local report
  report="$("${client_cpu[@]}" h2load -c "$conns" -m "$streams" -D "$dur" --warm-up-time=1s \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$3" \
    "http://$2${4:-/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit}" 2>&1)" \
    || { echo "bench.sh: h2load ($1) failed:" >&2; echo "$report" >&2; exit 1; }
  python3 - "$1" "$conns" "$streams" "$report" >> "$out" <<'PY'
import json, re, sys
name, conns, streams, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text).group(1))
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
codes = re.search(r"status codes: (\d+) 2xx", text)
errors = int(req.group(5)) + int(req.group(6)) if req else 0
if errors or not codes or int(codes.group(1)) == 0:
    sys.exit(f"bench.sh: h2load ({name}): {errors} failed or errored, or no 2xx:\n{text}")
print(json.dumps({"name": name, "mode": "closed", "rps": rps, "connections": conns, "streams": streams,
                  "latency_us": {"p50": None, "p99": None, "p99.9": None},
                  "outcomes": {"allowed": None, "over_limit": None, "errors": errors},
                  "client_cpu_pct": None, "server_cpu_pct": None}))
PY
}
# the bodies: what portcullis-loadtest sends, as one gRPC message each
body() { "$bin/portcullis-loadtest" --addr unused --write-request "$@"; }
body "$work/rls-ok.bin" --target rls
body "$work/rls-limited.bin" --target rls --descriptor-key limited
h2 noop-rls-1-h2load        "$noop_addr" "$work/rls-ok.bin"
h2 rls-1-desc-1-key-h2load  "$pc_addr"   "$work/rls-ok.bin"
h2 rls-limited-h2load       "$pc_addr"   "$work/rls-limited.bin"
check_path=/envoy.service.auth.v3.Authorization/Check
body "$work/check-ok.bin" --target ext-authz --api-key pk_bench_open
body "$work/check-limited.bin" --target ext-authz --api-key pk_bench_limited
h2 noop-ext-authz-h2load     "$noop_addr" "$work/check-ok.bin" "$check_path"
h2 ext-authz-api-key-h2load  "$pc_addr"   "$work/check-ok.bin" "$check_path"
# (pk_bench_limited's burst went in ext-authz-limited above: every one of these is refused)
h2 ext-authz-limited-h2load  "$pc_addr"   "$work/check-limited.bin" "$check_path"
# The same call with two cores for the servers (this machine's two, unpinned, h2load sharing
# them): `--runtime auto` gives each server one current-thread runtime per core for its gRPC
# connections; portcullis once more on tokio's multi-thread runtime, the shape it replaced.
start_two_cores() { # name args...: sets tc_pid and tc_addr
  local name="$1"; shift
  rm -f "$work/$name.listen"
  "$@" 2> >(grep --line-buffered -m1 'listening' > "$work/$name.listen"; cat > /dev/null) > "$work/$name.out" &
  tc_pid=$!; pids+=("$tc_pid")
  for _ in $(seq 1 300); do grep -q listening "$work/$name.listen" "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  tc_addr="$(sed -nE 's/.*"grpc_addr":"([^"]+)".*/\1/p; s/^listening (.*)/\1/p' "$work/$name.listen" "$work/$name.out" | head -n 1)"
  [ -n "$tc_addr" ] || { echo "bench.sh: $name did not start" >&2; cat "$work/$name.listen" "$work/$name.out" >&2; exit 1; }
}
if [ "$(nproc)" -ge 2 ] && [ "${#server_cpu[@]}" -gt 0 ]; then
  pinned_client=("${client_cpu[@]}"); client_cpu=(taskset -c 0,1)
  start_two_cores noop-2cores taskset -c 0,1 "$bin/portcullis-noop" --addr 127.0.0.1:0
  h2 noop-rls-1-2cores-h2load "$tc_addr" "$work/rls-ok.bin"; kill "$tc_pid"; wait "$tc_pid" 2>/dev/null || true
  start_two_cores pc-2cores taskset -c 0,1 "$portcullis" serve --config loadtest/bench/policy.yaml --log-format json
  h2 rls-1-desc-1-key-2cores-h2load "$tc_addr" "$work/rls-ok.bin"; kill "$tc_pid"; wait "$tc_pid" 2>/dev/null || true
  start_two_cores pc-2cores-mt taskset -c 0,1 "$portcullis" serve --config loadtest/bench/policy.yaml --log-format json --runtime multi-thread
  h2 rls-1-desc-1-key-2cores-multi-thread-h2load "$tc_addr" "$work/rls-ok.bin"; kill "$tc_pid"; wait "$tc_pid" 2>/dev/null || true
  client_cpu=("${pinned_client[@]}")
fi
# the Redis store: the same cases, and the ceiling of redis-benchmark running the same script by
# EVALSHA with the same concurrency (one connection per stream, not pipelined)
start_portcullis_redis
lt --name rls-1-desc-1-key-redis  --target rls --addr "$pcr_addr" --server-pid "$pcr_pid" --store-pid "$redis_pid" "${common[@]}" --expect all
lt --name rls-1-desc-100k-keys-redis --target rls --addr "$pcr_addr" --server-pid "$pcr_pid" --store-pid "$redis_pid" "${common[@]}" --keys 100000 --expect all
lt --name ext-authz-api-key-redis --target ext-authz --addr "$pcr_addr" --server-pid "$pcr_pid" --store-pid "$redis_pid" "${common[@]}" --api-key pk_bench_open --expect all
# the same with one of the 100,000 keys the store holds (the policy file's key above)
lt --name ext-authz-store-key-redis --target ext-authz --addr "$pcr_addr" --server-pid "$pcr_pid" --store-pid "$redis_pid" "${common[@]}" --api-key pk_bench_store_77777 --expect all
# Redis on the load generator's core instead of portcullis's (as a peer's figures are taken: each
# server on a core of its own), h2load sending the RLS call: what portcullis does when Redis is
# not competing with it for its core
if [ "${#server_cpu[@]}" -gt 0 ]; then
  taskset -a -p -c 1 "$redis_pid" > /dev/null
  h2 rls-1-desc-1-key-redis-own-core-h2load "$pcr_addr" "$work/rls-ok.bin"
  taskset -a -p -c 0 "$redis_pid" > /dev/null
fi
# a client hammering past its limit: after the first refusal, the over-limit cache answers
# without a Redis call (compare with rls-limited on the memory store, and the redis CPU column)
lt --name ext-authz-limited-redis --target ext-authz --addr "$pcr_addr" --server-pid "$pcr_pid" --store-pid "$redis_pid" "${common[@]}" --api-key pk_bench_limited --expect 100
lt --name rls-limited-redis       --target rls --addr "$pcr_addr" --server-pid "$pcr_pid" --store-pid "$redis_pid" "${common[@]}" --descriptor-key limited --expect 100
sha="$(redis-cli -p "$redis_port" SCRIPT LOAD "$(cat decision/src/store/lua/common.lua decision/src/store/lua/apply.lua)")"
redis_ticks() { awk '{print $14 + $15}' "/proc/$redis_pid/stat"; }
# not pipelined (the target's baseline), then 16 deep (what Redis itself can do with the script)
for depth in 1 16; do
  t0="$(date +%s.%N)"; c0="$(redis_ticks)"
  rps="$(timeout 120 "${client_cpu[@]}" redis-benchmark -p "$redis_port" -c $((conns * streams)) -n $(( ${dur%s} * 40000 )) -P "$depth" --csv \
    EVALSHA "$sha" 1 'rl:{bench}:s1' -1 1 s 1000000000 1000000 1 0 | tail -n 1 | cut -d, -f2 | tr -d '"')"
  t1="$(date +%s.%N)"; c1="$(redis_ticks)"
  name=redis-benchmark-evalsha; [ "$depth" = 1 ] || name="redis-benchmark-evalsha-pipelined-$depth"
  python3 -c 'import json,os,sys; rps,conns,t0,t1,c0,c1,name=sys.argv[1:]; print(json.dumps({"name": name, "mode": "closed", "rps": float(rps), "connections": int(conns), "streams": 1, "latency_us": {"p50": None, "p99": None, "p99.9": None}, "outcomes": {"allowed": None, "over_limit": None, "errors": 0}, "client_cpu_pct": None, "server_cpu_pct": None, "store_cpu_pct": (float(c1) - float(c0)) / os.sysconf("SC_CLK_TCK") / (float(t1) - float(t0)) * 100}))' \
    "$rps" "$((conns * streams))" "$t0" "$t1" "$c0" "$c1" "$name" >> "$out"
done

# open loop at half of the closed-loop peak: latency without coordinated omission; the no-op
# server at the same rate shows what the client and the machine add by themselves. The peak is
# capped at 0.6 of the no-op's closed-loop figure: our open-loop client (a timer per request)
# sends at most about that on its one core, and past it the rows would measure the client (at
# 44k/s offered it fell behind by seconds against the no-op too)
peak="$(python3 -c 'import json,sys; r={json.loads(l)["name"]: json.loads(l)["rps"] for l in open(sys.argv[1])}; print(int(min(r["ext-authz-api-key"], 0.6 * r["noop-ext-authz"])))' "$out")"
lt --name noop-ext-authz-half-peak --target ext-authz --addr "$noop_addr" --server-pid "$noop_pid" --connections "$conns" --duration "$dur" --rate $((peak / 2))
lt --name ext-authz-half-peak     --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" --connections "$conns" --duration "$dur" --rate $((peak / 2)) --api-key pk_bench_open --expect all

# latency against offered load, open loop at 20% to 80% of the closed-loop peak: rows and an SVG
svg="${out%.jsonl}-latency.svg"
lt --name ext-authz-sweep         --target ext-authz --addr "$pc_addr" --server-pid "$pc_pid" --connections "$conns" --duration "$dur" --api-key pk_bench_open --expect all \
  --rates "$((peak / 5)),$((peak * 2 / 5)),$((peak * 3 / 5)),$((peak * 4 / 5))" --svg "$svg"
echo "latency chart: $svg" >&2

python3 - "$out" "$mode" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["name"]: r for r in rows}
base = {"ext-authz": by["noop-ext-authz"], "native": by["noop-native"], "forward-auth": by["noop-forward-auth"], "rls-1": by["noop-rls-1"], "rls-5": by["noop-rls-5"]}
def baseline(name):
    if name.startswith("https-") or name.startswith("http-shim"): return by["https-envoy-direct"]
    if name.startswith("http-"): return by["http-envoy-direct"]
    if name.endswith("-2cores-h2load") or name.endswith("-2cores-multi-thread-h2load"): return by["noop-rls-1-2cores-h2load"]
    if name.startswith("ext-authz") and name.endswith("-h2load"): return by["noop-ext-authz-h2load"]
    if name == "rls-1-desc-1-key-redis-own-core-h2load": return by["rls-1-desc-1-key-h2load"]
    if name.endswith("-h2load"): return by["noop-rls-1-h2load"]
    if name == "rls-limited-redis": return by["rls-limited"]
    if name == "ext-authz-limited-redis": return by["ext-authz-limited"]
    if name.endswith("-redis"): return by["redis-benchmark-evalsha"]
    if name.startswith("ext-authz"): return base["ext-authz"]
    if name.startswith("native"): return base["native"]
    if name.startswith("forward-auth"): return base["forward-auth"]
    if name.startswith("rls-5"): return base["rls-5"]
    return base["rls-1"]
print(f"| case | req/s | vs baseline | p50 us | p99 us | p99.9 us | allowed | over limit | errors | client CPU | server CPU | redis CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
jwt, key, native, fa = by.get("ext-authz-jwt"), by.get("ext-authz-api-key"), by.get("native-api-key"), by.get("forward-auth-api-key")
for r in rows:
    if r["name"] == "memory-per-key": continue
    b = baseline(r["name"])
    fixed = r["name"].startswith("noop") or r["name"].startswith("redis-benchmark") or r["name"] in ("http-envoy-direct", "https-envoy-direct") or "open" in r["mode"]
    ratio = "-" if fixed else f'{r["rps"] / b["rps"]:.2f}'
    lat = r["latency_us"]
    val = lambda v: "-" if v is None else v
    cpu = lambda v: "-" if v is None else f"{v:.0f}%"
    print(f'| {r["name"]} ({r["mode"]}) | {r["rps"]:.0f} | {ratio} | {val(lat["p50"])} | {val(lat["p99"])} | {val(lat["p99.9"])} | {val(r["outcomes"]["allowed"])} | {val(r["outcomes"]["over_limit"])} | {r["outcomes"]["errors"]} | {cpu(r["client_cpu_pct"])} | {cpu(r["server_cpu_pct"])} | {cpu(r.get("store_cpu_pct"))} |')
print(open(sys.argv[1] + ".audit").read().strip())
print("\nbaselines: no-op cases for ext_authz, the native Check, forward-auth (a no-op HTTP/1.1 server) and RLS on the memory store; redis-benchmark EVALSHA (same script, same concurrency) for cases on Redis (rls-limited-redis and ext-authz-limited-redis: the same case on the memory store); Envoy alone (http-envoy-direct) for HTTP through Envoy with portcullis; Envoy alone over TLS (https-envoy-direct) for the HTTPS cases, Envoy's and the shim's; noop-rls-1-h2load and noop-ext-authz-h2load for the h2load rows (noop-rls-1-2cores-h2load for those on two cores; rls-1-desc-1-key-h2load, the memory store, for rls-1-desc-1-key-redis-own-core-h2load)")
ed, er, ea = by.get("http-envoy-direct"), by.get("http-envoy-rls-only"), by.get("http-envoy-portcullis")
if ed and er and ea:
    print(f"\nthrough one Envoy worker, against Envoy alone: the ratelimit call only {er['rps'] / ed['rps']:.2f}, ext_authz + ratelimit + access log {ea['rps'] / ed['rps']:.2f}")
se, sp, ee, ep = by.get("http-shim-direct"), by.get("http-shim-portcullis"), by.get("https-envoy-direct"), by.get("https-envoy-portcullis")
if se and sp and ee and ep:
    print(f"\nportcullis-shim vs one Envoy worker over HTTPS: direct {se['rps'] / ee['rps']:.2f}x, asking portcullis {sp['rps'] / ep['rps']:.2f}x the throughput")
ceil, piped = by.get("redis-benchmark-evalsha"), by.get("redis-benchmark-evalsha-pipelined-16")
us = lambda r, k: r[k] / 100 / r["rps"] * 1e6 if r and r.get(k) is not None and r["rps"] else float("nan")
for name in ("rls-1-desc-100k-keys-redis", "ext-authz-api-key-redis"):
    r = by.get(name)
    if r and ceil and piped:
        print(f"\nCPU per decision, {name}: portcullis {us(r, 'server_cpu_pct'):.0f} us, redis-server {us(r, 'store_cpu_pct'):.0f} us, load generator {us(r, 'client_cpu_pct'):.0f} us"
              f" (redis-server per EVALSHA under redis-benchmark: {us(ceil, 'store_cpu_pct'):.0f} us not pipelined, {us(piped, 'store_cpu_pct'):.0f} us 16 deep)")
pairs = [("RLS, memory store", "rls-1-desc-1-key", "rls-limited"), ("RLS, memory store, h2load", "rls-1-desc-1-key-h2load", "rls-limited-h2load"),
         ("RLS, Redis store", "rls-1-desc-1-key-redis", "rls-limited-redis"), ("ext_authz, memory store", "ext-authz-api-key", "ext-authz-limited"),
         ("ext_authz, memory store, h2load", "ext-authz-api-key-h2load", "ext-authz-limited-h2load"), ("ext_authz, Redis store", "ext-authz-api-key-redis", "ext-authz-limited-redis")]
shown = [f"{what} {by[lim]['rps'] / by[ok]['rps']:.2f}x" for what, ok, lim in pairs if ok in by and lim in by]
if shown:
    print("\nover the limit vs under it (refused vs allowed throughput): " + "; ".join(shown))
own = by.get("rls-1-desc-1-key-redis-own-core-h2load")
if own:
    print(f"\nRLS on Redis with redis-server on the load generator's core (portcullis alone on core 0), from h2load: {own['rps']:.0f}/s")
one, two, two_mt = by.get("rls-1-desc-1-key-h2load"), by.get("rls-1-desc-1-key-2cores-h2load"), by.get("rls-1-desc-1-key-2cores-multi-thread-h2load")
if one and two and two_mt:
    print(f"\nRLS from h2load on one core: {one['rps']:.0f}/s; on two (shared with h2load): {two['rps']:.0f}/s on per-core runtimes, {two['rps'] / two_mt['rps']:.2f}x the multi-thread runtime's {two_mt['rps']:.0f}/s")
if native and key:
    print(f"\nnative Check vs ext_authz Check (the same API-key decision): {native['rps'] / key['rps']:.2f}x the throughput")
if fa and key:
    print(f"\nforward-auth (HTTP/1.1) vs ext_authz Check (the same API-key decision): {fa['rps'] / key['rps']:.2f}x the throughput")
store_key, file_key = by.get("ext-authz-store-key-redis"), by.get("ext-authz-api-key-redis")
if store_key and file_key:
    print(f"\none of 100,000 store-held keys vs the policy file's key (Redis store): {store_key['rps'] / file_key['rps']:.2f}x the throughput")
if jwt and key:
    print(f"\nJWT (one RS256 token, cached after its first verification) vs API key: {key['rps'] / jwt['rps']:.2f}x the cost per decision")
m = by["memory-per-key"]
keys = m["outcomes"]["allowed"]
delta = m["server_rss_delta_bytes"]
if delta is not None and keys:
    print(f"\nmemory store: {keys} new keys grew portcullis's resident memory by {delta/1e6:.1f} MB = {delta/keys:.0f} bytes per key")
PY
