#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, GPU tests, per-layer and whole-network
# benchmarks, with every log under $OUT (default bench/results). Steps run in the order given:
#   bash bench/gpu_check.sh [install] [tests] [suite] [layers] [throughput] [compile] [startup]
#                           [mixed]
# (no argument: install tests layers throughput mixed). Each step has its own time limit so one
# slow step cannot eat the whole call; the last lines of each log are printed.
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n "${TAIL:-45}"
    echo "== $name: exit ${PIPESTATUS[0]}"
}
[ $# -eq 0 ] && set -- install tests layers throughput mixed
# pytest-xdist where the image has it (the step limits assume it), else one process
python -c "import xdist" 2>/dev/null && XDIST="-n 8" || { XDIST=""; echo "(no pytest-xdist)"; }
for s in "$@"; do
    case $s in
        install)
            nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version,memory.used \
                --format=csv | tee "$OUT/gpu.txt"
            step install 300 python -m pip install --no-build-isolation --no-deps -e .
            step planner 30 python -c "from vggfast import scheduler as S; from vggfast.configs \
import make_spec; print(S.make_plan(make_spec('D'), [(480, 640)]).summary())" ;;
        tests)      step tests 300 python -m pytest -q -p no:cacheprovider $XDIST \
                        tests/test_kernels.py tests/test_engine.py tests/test_launch.py ;;
        suite)      step suite 420 python -m pytest -q -p no:cacheprovider ${XDIST:+-n 12} tests ;;
        layers)     step layers 200 python bench/layers.py ;;
        throughput) step throughput 300 python bench/throughput.py --no-compile --out "$OUT" ;;
        compile)    step compile 560 python bench/throughput.py --compile-batches 64 --out "$OUT" ;;
        startup)    export TRITON_CACHE_DIR=$(mktemp -d)
                    step startup_cold 300 python bench/startup.py
                    step startup_warm 300 python bench/startup.py ;;
        warm)       step startup_warm 120 python bench/startup.py ;;   # after a throughput step
        mixed)      step mixed 240 python bench/plan_bench.py --gpu --out "$OUT/mixed.json" ;;
        *) echo "unknown step $s"; exit 2 ;;
    esac
done
