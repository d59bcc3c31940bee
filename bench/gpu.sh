#!/usr/bin/env bash
# A GPU host's measurements in one call (a GPU host's time is scarce): the CUDA
# tests that skip on a CPU, then the network alone, then the serving path with the real network,
# 1 and 12 MP, masks and cut-outs, 1, 16 and 64 clients, 1, 2 and 4 front processes. Each step's
# output goes to OUT (default bench/results/gpu), and a failed step does not stop the next.
#
#     bash bench/gpu.sh [OUT]          # from the repository root, `make install weights` done
#
# Time: by its count (not yet run on a GPU), 8-10 minutes: the ceiling's 36 levels of 7 s, three
# servers started, the network alone for a minute, the CUDA tests a few.
set -uo pipefail
out="${1:-bench/results/gpu}"
mkdir -p "$out"
py=.venv/bin/python
step() { local name="$1"; shift; echo "== $name: $*"; "$@" >"$out/$name.log" 2>&1; echo "   exit $?"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
step tests "$py" -m pytest -q -rs tests/test_parity.py tests/test_engines.py tests/test_postprocess.py \
    tests/test_api.py -k "cuda or parity or gpu"
step model "$py" -m bench.model --devices cuda --dtypes float16 float32 --batches 1 8 32 \
    --seconds 4 --rounds 2
step ceiling "$py" -m bench.ceiling --device cuda --photos 1mp 12mp --outputs mask cutout \
    --concurrency 1 16 64 --fronts 1 2 4 --seconds 6
tail -n +1 "$out"/*.log | tail -c 20000
