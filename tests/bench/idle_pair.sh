#!/usr/bin/env bash
# Agents side by side on the same N processes (issue 13): the workload of
# idle_scale.sh (N `sleep`s, or with MODE=active N processes burning ~1 ms every
# 2 s), each agent with idle_scale.sh's config; CPU (utime+stime) over SECS
# after 10 s of start-up, RSS every second (first, mean, max, last). Both see the
# same load, so their difference holds on a shared machine. Run as root:
#   tests/bench/idle_pair.sh N SECS "ENV=x /path/agent-a" "ENV=y /path/agent-b" [...]
# (each agent is `env` + its argument; X=1 when no variable is wanted).
N=$1; SECS=$2; shift 2
DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done; [ -n "$SPID" ] && kill -TERM -- -"$SPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
setsid python3 - "$N" "${MODE:-idle}" <<'PY' &
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
for _ in $(seq 120); do [ "$(pgrep -c -s "$SPID" || true)" -gt "$N" ] && break; sleep 1; done
i=0
for a in "$@"; do
  PORTS=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(3)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])'))
  cat > $DIR/a$i.toml <<TOML
ledger_path = "$DIR/ledger$i.db"
span_lag = "0s"
proc_map_entries = 32768
[api]
bind = "127.0.0.1:${PORTS[0]}"
[receiver]
grpc_bind = "127.0.0.1:${PORTS[1]}"
http_bind = "127.0.0.1:${PORTS[2]}"
TOML
  env $a run --config $DIR/a$i.toml 2>$DIR/a$i.log &
  PIDS+=($!); i=$((i+1))
done
sleep 10
HZ=$(getconf CLK_TCK)
declare -A T0
for p in "${PIDS[@]}"; do T0[$p]=$(awk '{print $14+$15}' /proc/$p/stat); done
for s in $(seq $SECS); do
  line="$s"; for p in "${PIDS[@]}"; do line="$line $(awk '/VmRSS/{printf "%.1f", $2/1024}' /proc/$p/status)"; done; echo "$line" >> $DIR/rss; sleep 1
done
i=0
for p in "${PIDS[@]}"; do
  t1=$(awk '{print $14+$15}' /proc/$p/stat)
  col=$((i+2))
  awk -v c=$col -v cpu=$(( t1 - ${T0[$p]} )) -v hz=$HZ -v secs=$SECS -v name="agent$i" '{s+=$c; if($c>m)m=$c; if(NR==1)f=$c; l=$c} END{printf "%s: CPU %.2f %% of a core; RSS first %.1f mean %.1f max %.1f last %.1f MiB\n", name, 100*cpu/hz/secs, f, s/NR, m, l}' $DIR/rss
  i=$((i+1))
done
cp $DIR/rss "${RSS_OUT:-/dev/null}"
uptime
