#!/usr/bin/env bash
# `make cpu-check`: the CPU targets in one command (about 20 minutes on 2 cores), on the machine
# they are for: a 2-core Intel Xeon with AMX. The packed engine against OpenVINO and the frozen
# torch.compile forward, the mixed-batch cost, the HTTP rates with wrk against the plain fp32 loop,
# the defaults against spread_batches=false and workers=1, then the targets met or not
# (benchmarks.targets). On a machine with more cores, CPUS=0,1 runs it
# on two of them (taskset), as the targets were set. Run it alone: nothing else on the cores.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
command -v wrk >/dev/null || { echo "cpu-check: wrk not found (apt-get install wrk)"; exit 2; }
pin=()
if [ -n "${CPUS:-}" ]; then pin=(taskset -c "$CPUS"); fi
grep -m1 "model name" /proc/cpuinfo
"$PY" -c "from piggyback_core import cpu_bf16_isa; import torch; print('bf16:', cpu_bf16_isa(), '| torch', torch.__version__)"
status=0
${pin[@]+"${pin[@]}"} "$PY" -m benchmarks.packed --arch resnet50 --arch resnet18 || status=$?
${pin[@]+"${pin[@]}"} "$PY" -m benchmarks.http --tasks 1,512 --clients 8,16 || status=$?
# how the batcher's defaults fare on this chip against not spreading and against one worker
${pin[@]+"${pin[@]}"} "$PY" -m benchmarks.http --tasks 1 --clients 1,4,8,16 --duration 10 --name http-workers \
    --server-args= --server-args=--no-spread-batches --server-args="--workers 1" || status=$?
"$PY" -m benchmarks.targets || status=$?
exit $status
