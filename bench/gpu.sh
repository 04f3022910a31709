#!/usr/bin/env bash
# The GPU checks (issue 21 item 6) for a lent H200, in ONE device `run` of under 8 minutes.
#
#   here, once, with a package registry:   bash bench/gpu.sh fetch      (wheels into .whl/, git-ignored)
#   on the device:                          run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
#
# The H200 image holds PyTorch, transformers, tokenizers, scipy, pandas, pyarrow, jinja2 and matplotlib
# (/work/.library/device/KINDS.md) but not diffusers, omegaconf, boto3 or huggingface_hub 2.x: those
# travel as wheels (the device README). Steps, each bounded so the whole fits in 8 minutes:
#   1. bench/unet_flops.py: the RadEdit-shaped UNet in bf16 at batch 8..256: UNet evaluations/s, TFLOP/s, MFU
#   2. bench/score_bench.py: the Scorer's prompts/s on the RadEdit-shaped model, bf16, G=4, T=5 (T=50 is 10x)
#   3. the committed testbed (testbed/model, 1,024 prompts, T=20, G=4) fully scored in fp32 and in bf16,
#      and by the multi-stage cascade with its self-check; bench/gpu_checks.py gives the cascade's recall of
#      the full top 1% and the bf16-vs-fp32 top-1% overlap, and writes the "GPU" section of bench/RESULTS.md.
# Everything lands in $OUT: log, unet_bf16.json, score_bench.txt, checks.json, RESULTS.md (copy its GPU
# section into bench/RESULTS.md here).
set -uo pipefail
WHEELS="diffusers==0.42.1 omegaconf==2.4.0 boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5"
if [ "${1:-}" = fetch ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
    for w in $WHEELS; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$w" || exit 1
    done
    du -sh .whl; exit 0
fi
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); echo "GPU: $GPU"
CLI="python3 -m cxrmem.cli"
step() { echo "== $1 ($(date +%T))"; }

step "1 UNet bf16 throughput"
timeout 120 python3 bench/unet_flops.py --device cuda --dtype bfloat16 --batch-sizes 8,16,32,64,128,256 --repeats 5 \
    --json "$OUT/unet_bf16.json"

step "2 Scorer prompts/s, RadEdit-shaped, bf16"
timeout 150 python3 bench/score_bench.py --radedit-shaped --device cuda --dtype bfloat16 --steps 5 \
    --batch-sizes 8,32,128 --prompts 256 --loop-prompts 8 --rounds 1 | tee "$OUT/score_bench.txt"

step "3 testbed: full fp32, full bf16, cascade"
BASE="--config conf/demo.yaml model.device=cuda corpus.max_reports=null score.batch_size=128 run.overwrite=true"
R=/tmp/gpu_runs
$CLI prepare $BASE run.output=$R/fp32 >/dev/null || exit 1
for run in bf16 cascade; do mkdir -p $R/$run; cp $R/fp32/prompts.parquet $R/$run/; done
timeout 90 $CLI score $BASE run.output=$R/fp32 >/dev/null
timeout 90 $CLI score $BASE run.output=$R/bf16 model.dtype=bfloat16 >/dev/null
timeout 90 $CLI score $BASE run.output=$R/cascade cascade.enabled=true cascade.audit_sample=100 \
    'cascade.stages=[{screen: dmem, keep_percent: 10, steps: 1}, {screen: dmem, keep_percent: 30, steps: 4}]' >/dev/null
cp bench/RESULTS.md "$OUT/RESULTS.md"
python3 bench/gpu_checks.py --gpu "$GPU" --unet "$OUT/unet_bf16.json" --full $R/fp32 --cascade $R/cascade \
    --fp32 $R/fp32 --bf16 $R/bf16 --json "$OUT/checks.json" --results "$OUT/RESULTS.md"
step done
