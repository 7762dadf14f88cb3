#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, GPU tests, per-layer and whole-network
# benchmarks. Steps run in the order given:
#   bash bench/gpu_check.sh [install] [tests] [suite] [layers] [throughput] [compile] [startup]
#                           [warm] [mixed]
# No argument: install throughput mixed, which fits one 10-minute call (at most 9 minutes by
# the step limits) of a 15-minute device budget that also pays the machine's start. Each step has
# its own time limit so one slow step cannot eat the whole call; the last lines of each log are
# printed. Logs and results go to $RES (default bench/results); when $OUT is set (the device
# tool's return folder, which brings back at most 8 files) all of $RES is packed into the one
# file $OUT/gpu_check.tgz after every step, so a call stopped at its limit still returns what
# the finished steps wrote.
set -o pipefail
RES=${RES:-bench/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
# Untuned tiles by default (the first of each list in kernels/conv.py, picked by the autotuner on
# an H100 in run A): a cold autotune of every layer shape, batch class, split-K and grouped
# variant may not fit the step limits. VGGFAST_AUTOTUNE=1 bash bench/gpu_check.sh ... tunes; the
# results' meta says which.
export VGGFAST_AUTOTUNE=${VGGFAST_AUTOTUNE:-0}
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check.tgz" -C "$RES" . 2>/dev/null; true; }
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$RES/$name.log" | tail -n "${TAIL:-45}"
    echo "== $name: exit ${PIPESTATUS[0]}"
    pack
}
[ $# -eq 0 ] && set -- install throughput mixed
# pytest-xdist where the image has it (the step limits assume it), else one process
python -c "import xdist" 2>/dev/null && XDIST="-n 8" || { XDIST=""; echo "(no pytest-xdist)"; }
for s in "$@"; do
    case $s in
        install)
            nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version,memory.used \
                --format=csv | tee "$RES/gpu.txt"
            step install 120 python -m pip install --no-build-isolation --no-deps -e .
            step planner 20 python -c "from vggfast import scheduler as S; from vggfast.configs \
import make_spec; print(S.make_plan(make_spec('D'), [(480, 640)]).summary())" ;;
        tests)      step tests 300 python -m pytest -q -p no:cacheprovider $XDIST \
                        tests/test_kernels.py tests/test_engine.py tests/test_launch.py ;;
        suite)      step suite 420 python -m pytest -q -p no:cacheprovider ${XDIST:+-n 12} tests ;;
        layers)     step layers 200 python bench/layers.py ;;
        throughput) step throughput 240 python bench/throughput.py --no-compile --out "$RES" ;;
        compile)    step compile 560 python bench/throughput.py --compile-batches 64 --out "$RES" ;;
        startup)    export TRITON_CACHE_DIR=$(mktemp -d)
                    step startup_cold 300 python bench/startup.py
                    step startup_warm 300 python bench/startup.py ;;
        warm)       step startup_warm 120 python bench/startup.py ;;   # after a throughput step
        mixed)      step mixed 150 python bench/plan_bench.py --gpu --out "$RES/mixed.json" ;;
        *) echo "unknown step $s"; exit 2 ;;
    esac
done
