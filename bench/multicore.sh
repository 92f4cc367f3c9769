#!/usr/bin/env bash
# The side-by-side figures on a many-core box, where the load generator is
# not the limit: the server (chatd or a peer) pinned to one core, the
# generator spread over others. Writes results.jsonl, the tables (log) and
# one plot per scenario into OUT.
#   bench/multicore.sh OUT [SERVER_CPU] [GEN_CPUS] [PEERS]
set -euo pipefail
out=${1:?usage: bench/multicore.sh OUT [SERVER_CPU] [GEN_CPUS] [PEERS]}
server=${2:-0}
gen=${3:-2-13}
peers=${4:-websockets,aiohttp,node,picows}
mkdir -p "$out"
run() { python3 -m chatd_bench.cli "$@" --pin "$server:$gen" --vs "$peers" --quiet \
          --json "$out/results.jsonl" 2>&1 | tee -a "$out/log"; }
echo "cores: $(nproc); server on $server, generator on $gen; peers $peers" | tee "$out/log"
run private --users 400 --window 20 --procs 6 --duration 10 --plot "$out/private.png"
run group --members 100 --groups 4 --senders 4 --window 10 --procs 6 --duration 8 \
    --plot "$out/group.png"
run connect --conns 19000 --conn-rate 5000 --hold 3 --procs 4 --plot "$out/connect.png"
