#!/usr/bin/env bash
# Memory that returns (issue 13): the daemon's RSS every 5 s through a churn of
# short-lived processes (fork+exec /bin/true, 2 in flight) and the idle time after.
# Run as root from the repository root after `cargo xtask build`:
#   tests/bench/churn.sh [PROCESSES=200000] [IDLE_SECONDS=120]
# AGENT=path picks the binary; AGENT_B=path runs a second one beside it on the
# same churn (before/after in one run). Prints CSV: seconds, phase, RSS MiB of
# each agent, then a summary line per agent (before, peak, end, end - before).
set -euo pipefail
TOTAL=${1:-200000}; IDLE=${2:-120}
AGENTS=("${AGENT:-${TEST_AGENT_BIN:-target/release/mentat-agent}}")
[ -n "${AGENT_B:-}" ] && AGENTS+=("$AGENT_B")
DIR=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
for i in "${!AGENTS[@]}"; do
    PORTS=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(3)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])'))
    cat > "$DIR/agent-$i.toml" <<TOML
ledger_path = "$DIR/ledger-$i.db"
span_lag = "0s"
[api]
bind = "127.0.0.1:${PORTS[0]}"
[receiver]
grpc_bind = "127.0.0.1:${PORTS[1]}"
http_bind = "127.0.0.1:${PORTS[2]}"
TOML
    "${AGENTS[$i]}" run --config "$DIR/agent-$i.toml" 2>"$DIR/agent-$i.log" &
    PIDS+=($!)
done
sleep 10
rss() { for p in "${PIDS[@]}"; do printf ",%.1f" "$(awk '/VmRSS/ {print $2/1024}' /proc/$p/status)"; done; }
T0=$(date +%s)
echo "seconds,phase$(for i in "${!AGENTS[@]}"; do printf ",rss_mib_%s" "$i"; done)"
echo "0,before$(rss)" | tee "$DIR/before"
seq "$TOTAL" | xargs -P2 -n2000 sh -c 'for i in "$@"; do /bin/true; done' _ &
CHURN=$!
while kill -0 "$CHURN" 2>/dev/null; do
    sleep 5; echo "$(( $(date +%s) - T0 )),churn$(rss)"
done | tee "$DIR/churn"
END_CHURN=$(date +%s)
while [ $(( $(date +%s) - END_CHURN )) -lt "$IDLE" ]; do
    sleep 5; echo "$(( $(date +%s) - T0 )),idle$(rss)"
done | tee "$DIR/idle"
python3 - "$DIR" "${AGENTS[@]}" <<'PY'
import sys
d, agents = sys.argv[1], sys.argv[2:]
rows = lambda f: [list(map(float, l.split(",")[2:])) for l in open(f"{d}/{f}") if l.strip()]
before, churn, idle = rows("before")[0], rows("churn"), rows("idle")
for i, a in enumerate(agents):
    peak = max(r[i] for r in churn + idle)
    end = idle[-1][i]
    print(f"{a}: RSS before {before[i]:.1f} MiB, peak {peak:.1f}, after idle {end:.1f} ({end - before[i]:+.1f} MiB)")
PY
