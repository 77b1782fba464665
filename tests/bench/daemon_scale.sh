#!/usr/bin/env bash
# The daemon's own CPU and peak RSS with N active workloads and OTLP export on
# (issue 4's benchmark). Run as root from the repository root after
# `cargo xtask build`:   tests/bench/daemon_scale.sh [N=1000] [SECONDS=30]
# N processes each burn ~1 ms of CPU every 2 s (0.5 core in all at N=1000, so
# a 2-core machine is not saturated) and hold memory, so every one has a
# record in every window; export goes to the tests' independent OTLP receiver.
set -euo pipefail
N=${1:-1000}; SECS=${2:-30}
AGENT=${TEST_AGENT_BIN:-target/release/mentat-agent}
DIR=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$DIR"' EXIT
python3 tests/py/otlp_receiver.py --port 14397 --out "$DIR/received.jsonl" >/dev/null 2>&1 &
cat > "$DIR/agent.toml" <<TOML
ledger_path = "$DIR/ledger.db"
span_lag = "0s"
proc_map_entries = 16384
[api]
bind = "127.0.0.1:19497"
[receiver]
grpc_bind = "127.0.0.1:14398"
http_bind = "127.0.0.1:14399"
[otlp]
endpoint = "http://127.0.0.1:14397"
TOML
python3 - "$N" <<'PY' &
import os, sys, time, signal
n = int(sys.argv[1])
for _ in range(n):
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        while True:
            t = time.process_time()
            while time.process_time() - t < 0.001: pass
            time.sleep(2.0)
while True: time.sleep(1)
PY
sleep 5
# The per-window summary line (counted below) is logged at DEBUG.
RUST_LOG="${RUST_LOG:-info,mentat_agent::daemon=debug}" "$AGENT" run --config "$DIR/agent.toml" 2>"$DIR/agent.log" &
APID=$!
sleep 5   # start-up and the first windows
t0=$(awk '{print $14+$15}' /proc/$APID/stat)
sleep "$SECS"
t1=$(awk '{print $14+$15}' /proc/$APID/stat)
HZ=$(getconf CLK_TCK)
HWM=$(awk '/VmHWM/ {print $2}' /proc/$APID/status)
RSS=$(awk '/VmRSS/ {print $2}' /proc/$APID/status)
kill -INT $APID; wait $APID || true
WINDOWS=$(grep -c "window closed" "$DIR/agent.log" || true)
RECORDS=$(python3 -c "import json,sys; print(sum(len(json.loads(l).get('record_ids',[])) for l in open('$DIR/received.jsonl')))" 2>/dev/null || echo "?")
python3 - <<PY
cpu = ($t1 - $t0) / $HZ
print(f"workloads {$N}, measured {$SECS} s: agent CPU {cpu:.2f} s = {100*cpu/$SECS:.1f} % of one core; "
      f"RSS {$RSS/1024:.1f} MiB, peak {$HWM/1024:.1f} MiB; windows logged {$WINDOWS}; records received over OTLP {'$RECORDS'}")
PY
pkill -TERM -P $(jobs -p | tail -1) 2>/dev/null || true
