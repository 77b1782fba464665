#!/usr/bin/env bash
# Commit latency of `mentat-agent run` with and without N /v1/stream clients
# (issue 15). One daemon (1 s tick, span_lag 0): SECS seconds with no client,
# then SECS seconds with N WebSocket clients grouped by GROUP (default pid:
# the largest messages) reading every window (tests/py/stream_many.py). The
# commit latency of a window is the ledger's `windows.committed_ns - we_ns`
# (its end to its durable commit: closing, pricing and the SQLite commit);
# p50/p90/max per phase, and the agent's CPU per phase. Run as root:
#   tests/bench/stream_clients.sh /path/mentat-agent [N=50] [SECS=60] [GROUP=pid]
AGENT=$1; N=${2:-50}; SECS=${3:-60}; GROUP=${4:-pid}
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=$(mktemp -d)
cleanup() { [ -n "$APID" ] && kill -INT "$APID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
PORTS=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(3)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])'))
cat > $DIR/a.toml <<TOML
ledger_path = "$DIR/ledger.db"
span_lag = "0s"
[api]
bind = "127.0.0.1:${PORTS[0]}"
stream_max_clients = $((N + 8))
[receiver]
grpc_bind = "127.0.0.1:${PORTS[1]}"
http_bind = "127.0.0.1:${PORTS[2]}"
TOML
"$AGENT" run --config $DIR/a.toml 2>$DIR/a.log &
APID=$!
for _ in $(seq 60); do curl -sf "http://127.0.0.1:${PORTS[0]}/readyz" >/dev/null && break; sleep 1; done
sleep 5
cpu() { awk '{print $14+$15}' /proc/$APID/stat; }
T0=$(date +%s%N); C0=$(cpu)
sleep "$SECS"
T1=$(date +%s%N); C1=$(cpu)
python3 "$HERE/../py/stream_many.py" "ws://127.0.0.1:${PORTS[0]}/v1/stream?group_by=$GROUP" "$N" "$SECS"
T2=$(date +%s%N); C2=$(cpu)
HZ=$(getconf CLK_TCK)
awk -v a=$C0 -v b=$C1 -v c=$C2 -v hz=$HZ -v s=$SECS -v n=$N 'BEGIN{printf "agent CPU: no clients %.1f %% of a core, %d clients %.1f %%\n", 100*(b-a)/hz/s, n, 100*(c-b)/hz/s}'
sleep 3
curl -s "http://127.0.0.1:${PORTS[0]}/metrics" | grep -E '^mentat_agent_(stream_clients_dropped|stream_clients_refused|commit_failures)_total'
python3 - "$DIR/ledger.db" "$T0" "$T1" "$T2" "$N" <<'PY'
import sqlite3, sys
db, t0, t1, t2, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
def phase(name, a, b):
    lat = sorted((cn - we) / 1e6 for we, cn in c.execute(
        "SELECT we_ns, committed_ns FROM windows WHERE we_ns >= ? AND we_ns < ?", (a, b)))
    if not lat:
        print(f"{name}: no windows"); return
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    print(f"{name}: {len(lat)} windows, commit latency p50 {q(0.5):.1f} ms, p90 {q(0.9):.1f} ms, max {lat[-1]:.1f} ms")
phase("no clients", t0, t1)
phase(f"{n} clients", t1, t2)
PY
