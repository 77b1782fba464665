#!/usr/bin/env bash
# The daemon's own cost with N idle processes (`sleep`), or N active ones
# (each burns ~1 ms of CPU every 2 s), as a new user runs it (issue 13).
# Run as root from the repository root after `cargo xtask build`:
#   tests/bench/idle_scale.sh [N=10000] [SECONDS=60] [idle|active]
# Prints: the agent's CPU (utime+stime over SECONDS, % of one core), RSS and
# peak RSS, syscalls per process per tick (strace -c over STRACE_SECS, 10 s, a
# separate period: strace slows the agent, not what it reads), ledger bytes per
# process-hour (growth of ledger.db + its WAL over SECONDS) and records committed
# per window (the "window closed" log lines). AGENT=path picks the binary.
set -euo pipefail
N=${1:-10000}; SECS=${2:-60}; MODE=${3:-idle}; STRACE_SECS=${STRACE_SECS:-10}
AGENT=${AGENT:-${TEST_AGENT_BIN:-target/release/mentat-agent}}
DIR=$(mktemp -d)
PORTS=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(4)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])'))
cleanup() {
    [ -n "${APID:-}" ] && kill -INT "$APID" 2>/dev/null && wait "$APID" 2>/dev/null || true
    [ -n "${SPID:-}" ] && kill -TERM -- -"$SPID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
cat > "$DIR/agent.toml" <<TOML
ledger_path = "$DIR/ledger.db"
span_lag = "0s"
proc_map_entries = 32768
[api]
bind = "127.0.0.1:${PORTS[0]}"
[receiver]
grpc_bind = "127.0.0.1:${PORTS[1]}"
http_bind = "127.0.0.1:${PORTS[2]}"
TOML
# The workload in its own session, so it is stopped as one group.
setsid python3 - "$N" "$MODE" <<'PY' &
import os, sys, time, signal
n, mode = int(sys.argv[1]), sys.argv[2]
for _ in range(n):
    if os.fork() == 0:
        if mode == "idle":
            os.execvp("sleep", ["sleep", "3600"])
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        while True:
            t = time.process_time()
            while time.process_time() - t < 0.001: pass
            time.sleep(2.0)
while True: time.sleep(1)
PY
SPID=$!
# Until all N are running.
for _ in $(seq 120); do
    [ "$(pgrep -c -s "$SPID" || true)" -gt "$N" ] && break; sleep 1
done
"$AGENT" run --config "$DIR/agent.toml" 2>"$DIR/agent.log" &
APID=$!
sleep 10   # start-up, the first sweep and the first windows
size() { cat "$DIR"/ledger.db* 2>/dev/null | wc -c; }
HZ=$(getconf CLK_TCK)
t0=$(awk '{print $14+$15}' /proc/$APID/stat); b0=$(size); w0=$(grep -c "window closed" "$DIR/agent.log" || true)
sleep "$SECS"
t1=$(awk '{print $14+$15}' /proc/$APID/stat); b1=$(size); w1=$(grep -c "window closed" "$DIR/agent.log" || true)
HWM=$(awk '/VmHWM/ {print $2}' /proc/$APID/status)
RSS=$(awk '/VmRSS/ {print $2}' /proc/$APID/status)
cp /dev/null "$DIR/strace.txt"
timeout -s INT "$STRACE_SECS" strace -f -c -p "$APID" -o "$DIR/strace.txt" 2>/dev/null || true
python3 - "$DIR" <<PY
import re, sys
d = sys.argv[1]
secs, n, strace_secs = $SECS, $N, $STRACE_SECS
cpu = ($t1 - $t0) / $HZ
windows = max($w1 - $w0, 1)
ledger = ($b1 - $b0) / n / (secs / 3600)
calls, top = 0, []
for line in open(f"{d}/strace.txt"):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit():
        if f[-1] == "total":
            calls = int(f[3])
        else:
            top.append((int(f[3]), f[-1]))
top = " ".join(f"{name}={c}" for c, name in sorted(top, reverse=True)[:6])
log = re.sub(r"\x1b\[[0-9;]*m", "", open(f"{d}/agent.log").read())
committed = [int(m) for m in re.findall(r"committed=(\d+)", log)][-20:]
per_window = sum(committed) / len(committed) if committed else float("nan")
print(f"{'$MODE'} processes {n}, measured {secs} s ({windows} windows): agent CPU {100*cpu/secs:.2f} % of one core; "
      f"RSS {$RSS/1024:.1f} MiB, peak {$HWM/1024:.1f} MiB; "
      f"syscalls {calls / n / strace_secs:.3f} per process per tick (strace -f -c, {strace_secs} s; top: {top}); "
      f"ledger {ledger:,.0f} bytes per process-hour; records committed per window {per_window:.0f}")
PY
