#!/usr/bin/env bash
# Span intake throughput (issue 11 §2): how many spans per second the daemon's
# OTLP receiver takes and keeps, what that costs it in CPU per 10,000 spans,
# and its memory. Run as root from the repository root after `cargo xtask build`:
#
#   tests/bench/span_intake.sh [RATE=50000] [SECONDS=20] [CLIENTS=4]
#
# Two phases against one daemon with the default [receiver] bounds and span_lag:
#  - burst: the issue's measurement, 100,000 spans in 500 gRPC requests of 200 from
#    4 threads, as fast as the client sends;
#  - sustained: CLIENTS client processes, each pacing RATE/CLIENTS spans per second
#    for SECONDS (every request built before the clock starts, so Python's encoding
#    is not what is measured).
# Every span carries a run (flow.run_id, so it is indexed for the split; one trace
# per request of 200 spans, as an agent's run has one trace of many spans) and 1 input
# token (so each one kept is one token record). After each phase the ledger's token
# total for the phase's run is compared with what the clients were told was
# accepted: "lost" must be 0. Refused spans are the clients' to resend.
set -euo pipefail
RATE=${1:-50000}; SECS=${2:-20}; CLIENTS=${3:-4}
AGENT=${TEST_AGENT_BIN:-target/release/mentat-agent}
CLIENT=tests/py/otlp_client.py
DIR=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$DIR"' EXIT
API=19517; GRPC=14418
cat > "$DIR/agent.toml" <<TOML
ledger_path = "$DIR/ledger.db"
[api]
bind = "127.0.0.1:$API"
[receiver]
grpc_bind = "127.0.0.1:$GRPC"
http_bind = "127.0.0.1:14419"
TOML
# The per-window summary line (counted below) is logged at DEBUG.
RUST_LOG="${RUST_LOG:-info,mentat_agent::daemon=debug}" "$AGENT" run --config "$DIR/agent.toml" 2>"$DIR/agent.log" &
APID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$API/readyz" >/dev/null && break; sleep 0.3; done
sleep 3
HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$APID/stat; }
kib() { awk "/$1/ {print \$2}" /proc/$APID/status; }
tokens() {  # the ledger's input tokens for run $1
  curl -sf "http://127.0.0.1:$API/v1/usage?from=$(date -u -d '-10 min' +%FT%TZ)&where=run_id=$1" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["root"]["totals"]["tokens_input"])'
}
settle() {  # waits until the ledger holds $2 tokens for run $1 (span_lag + ticks)
  for _ in $(seq 60); do [ "$(tokens "$1")" -ge "$2" ] && break; sleep 1; done
}
report() {  # phase, accepted, refused, seconds, cpu ticks, run
  settle "$6" "$2"
  local kept; kept=$(tokens "$6")
  python3 - "$@" "$kept" "$HZ" "$(kib VmRSS)" "$(kib VmHWM)" <<'PY'
import sys
phase, acc, ref, secs, ticks, run, kept, hz, rss, hwm = sys.argv[1:]
acc, ref, secs, ticks, kept, hz = int(acc), int(ref), float(secs), int(ticks), int(kept), int(hz)
cpu = ticks / hz
print(f"{phase}: accepted {acc} spans in {secs:.2f} s = {acc/secs:,.0f} spans/s; refused in the "
      f"response {ref}; kept in the ledger {kept}; lost {acc - kept}; daemon CPU {cpu:.2f} s = "
      f"{cpu / max(acc, 1) * 1e4 * 1000:.1f} ms per 10k spans ({100 * cpu / secs:.0f} % of a core "
      f"while sending); RSS {int(rss)/1024:.1f} MiB, peak {int(hwm)/1024:.1f} MiB")
PY
}

# Burst.
RUN=burst-$$
t0=$(cpu)
python3 "$CLIENT" grpc --target 127.0.0.1:$GRPC --spans 200 --requests 500 --threads 4 \
  --run-id "$RUN" --tokens 1 --pregen --trace-per-request > "$DIR/burst.json"
t1=$(cpu)
read -r ACC REF SEC < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["accepted"], d["spans_sent"]-d["accepted"], d["seconds"])' "$DIR/burst.json")
report burst "$ACC" "$REF" "$SEC" $((t1 - t0)) "$RUN"

# Sustained.
sleep 15   # the burst's spans leave the index (span_lag + a tick)
RUN=sustained-$$
PER=$((RATE / CLIENTS)); REQ=$((PER * SECS / 200))
pids=()
for i in $(seq "$CLIENTS"); do
  python3 "$CLIENT" grpc --target 127.0.0.1:$GRPC --spans 200 --requests "$REQ" --threads 2 \
    --run-id "$RUN" --tokens 1 --pregen --trace-per-request --rate "$PER" > "$DIR/sustained-$i.json" &
  pids+=($!)
done
# The clients build their requests first; the clock starts when they send.
t0=$(cpu)
wait "${pids[@]}"
t1=$(cpu)
read -r ACC REF SEC < <(python3 - "$DIR" "$CLIENTS" <<'PY'
import json, sys
d = [json.load(open(f"{sys.argv[1]}/sustained-{i}.json")) for i in range(1, int(sys.argv[2]) + 1)]
print(sum(x["accepted"] for x in d), sum(x["spans_sent"] - x["accepted"] for x in d),
      max(x["seconds"] for x in d))
PY
)
report "sustained at $RATE/s offered" "$ACC" "$REF" "$SEC" $((t1 - t0)) "$RUN"
kill -INT $APID; wait $APID || true
grep -c "window closed" "$DIR/agent.log" | sed 's/^/windows logged: /'
