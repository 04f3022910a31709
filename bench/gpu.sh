#!/usr/bin/env bash
# The GPU benchmark (issue 30, Deliver 7) on a lent H100 / H200, in ONE device `run` of 8 minutes:
#
#   here, once, with a package registry:  bash bench/gpu.sh fetch       (wheels into .whl/, git-ignored)
#   on the device:                         run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=480)
#   on the device, some steps again:       run(command="bash bench/gpu.sh --only scorer,cascade", carry=[".whl"])
#
# This file only installs what the device image lacks and starts bench/gpu_bench.py, which does the work
# (its docstring: the steps and their budgets, about 6 of the 8 minutes). The image holds PyTorch,
# transformers, tokenizers, huggingface_hub 1.x, scipy, pandas and pyarrow (/work/.library/device/KINDS.md)
# but not diffusers or omegaconf: those travel as wheels (.whl/min). If cxrmem's imports then fail with
# the image's transformers, the versions the suite runs with (docker/constraints.txt: transformers 5.25,
# huggingface_hub 2.4 and what it needs, .whl/full) go in over them. Everything lands in $OUT: log.txt,
# bench.jsonl (one line per measurement, appended as it is made) and bench.md (the tables, rewritten
# after each measurement), so a cut run still returns what it measured.
set -uo pipefail
MIN="diffusers==0.42.1 omegaconf==2.4.0"
FULL="transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 kernels==0.19.1"
if [ "${1:-}" = fetch ]; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    for set in min full; do
        list=$MIN; [ $set = full ] && list=$FULL
        for w in $list; do
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                --platform any -d .whl/$set "$w" || exit 1
        done
    done
    du -sh .whl/*; exit 0
fi
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "gpu.sh: start $(date +%T)"
export GPU_BENCH_T0=$(date +%s.%N)  # the driver counts the setup from here
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/min/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
check() { python3 -c "import diffusers, transformers, omegaconf; import cxrmem.scoring.scorer, cxrmem.config" 2>&1 | tail -3; }
if ! check; then
    echo "gpu.sh: the image's transformers / huggingface_hub do not import with cxrmem: installing the suite's versions"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/full/*.whl || exit 1
    check || exit 1
fi
python3 -c "import torch, transformers, diffusers; print('gpu.sh: torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
echo "gpu.sh: set up $(date +%T)"
python3 bench/gpu_bench.py --out "$OUT" "$@"
