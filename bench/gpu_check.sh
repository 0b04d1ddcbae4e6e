#!/usr/bin/env bash
# One-shot GPU check (about 7-9 minutes): training-step benchmark at fp32 and bf16, then a short bf16-mixed
# training run of the demo. Every part runs even if an earlier one fails; all output goes to $OUT.
#
#   bash bench/gpu_check.sh --prepare   # here, once: stage the Python packages the GPU image lacks
#   bash bench/gpu_check.sh             # on the GPU machine, from the repository root
#
# The GPU image has torch, torchvision, pytorch-lightning, PyYAML and rich, but no hydra-core, omegaconf or
# faiss-cpu, and no package registry. --prepare copies the pure-Python hydra, omegaconf and antlr4 packages
# from .venv and downloads the faiss-cpu wheel for CPython 3.12 into bench/results/gpu_deps (git-ignored;
# carry that path). Where a registry is reachable, missing packages are installed from it instead.
# Nothing is written outside the repository: the project runs from src/ through PYTHONPATH (no pip install
# into the system), packages go to bench/results/gpu_site, the demo's data and logs to data/ and outputs/.
# Files in $OUT (at most 8): gpu_check.log, summary.txt, bench_fp32.{txt,json}, bench_bf16.{txt,json},
# bench_fp32_lowmem.txt, train_bf16.log.

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
DEPS=$ROOT/bench/results/gpu_deps
SITE=$ROOT/bench/results/gpu_site
FAISS_VERSION=1.15.1

if [ "${1:-}" = "--prepare" ]; then
    set -ex
    purelib=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    rm -rf "$DEPS" && mkdir -p "$DEPS/py" "$DEPS/wheels"
    for pkg in hydra omegaconf antlr4; do
        cp -r "$purelib/$pkg" "$DEPS/py/"
    done
    find "$DEPS/py" -name __pycache__ -type d -prune -exec rm -rf {} +
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEPS/wheels" "faiss-cpu==$FAISS_VERSION"
    du -sh "$DEPS"
    exit 0
fi

OUT=${OUT:-$ROOT/bench/results/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
set -x
export WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
declare -A RC

# ------------------------------------------------------------------ environment
PY=python3
if ! $PY -c "import torch" 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
    PY=/opt/torch/.venv/bin/python3
fi
git rev-parse HEAD 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import sys, torch, torchvision, pytorch_lightning as pl; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); \
print('torchvision', torchvision.__version__, 'lightning', pl.__version__)"

# ------------------------------------------------------------------ packages (the project itself runs from src/)
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
missing() { ! $PY -c "import hydra, omegaconf, faiss" 2>/dev/null; }
if missing && [ -d "$DEPS/py" ]; then
    export PYTHONPATH=$DEPS/py:$PYTHONPATH
fi
if missing && compgen -G "$DEPS/wheels/*.whl" >/dev/null; then
    $PY -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$DEPS"/wheels/*.whl
    export PYTHONPATH=$SITE:$PYTHONPATH
fi
if missing; then
    # Only where a registry answers; torch and the rest stay as installed.
    $PY -m pip install --quiet --timeout 15 --retries 0 --no-compile --target "$SITE" \
        "hydra-core>=1.3.8,<1.4" "omegaconf>=2.3,<2.4" "faiss-cpu>=1.8"
    export PYTHONPATH=$SITE:$PYTHONPATH
fi
$PY -c "import hydra, omegaconf, faiss, dgnetpp_pl; print('hydra', hydra.__version__, 'faiss', faiss.__version__)"
RC[packages]=$?

# ------------------------------------------------------------------ training-step benchmark, fp32 and bf16
for prec in fp32 bf16; do
    timeout 130 $PY bench/train_step.py --device cuda --precision "$prec" --in-process --iters 5 --warmup 2 \
        --baseline-iters 20 --json "$OUT/bench_$prec.json" 2>&1 | tee "$OUT/bench_$prec.txt"
    RC[bench_$prec]=$?
done
# The memory-saving preset at fp32, for the <= 10 GB peak GPU memory goal.
timeout 130 $PY bench/train_step.py --model dgnetpp_lowmem --device cuda --in-process --iters 3 --warmup 1 \
    --baseline-iters 10 2>&1 | tee "$OUT/bench_fp32_lowmem.txt"
RC[bench_fp32_lowmem]=$?

# ------------------------------------------------------------------ short bf16-mixed training of the demo
timeout 170 $PY -m dgnetpp_pl experiment=demo trainer=gpu trainer.precision=bf16-mixed \
    source.max_epochs=1 adapt.max_epochs=2 adapt.warmup_epochs=1 trainer.limit_train_batches=20 \
    trainer.enable_progress_bar=false 2>&1 | tee "$OUT/train_bf16.log"
RC[train_bf16]=$?
if grep -qiE "non-finite|nan loss|Traceback" "$OUT/train_bf16.log"; then
    RC[train_bf16_clean]=1
else
    RC[train_bf16_clean]=0
fi

# ------------------------------------------------------------------ summary
set +x
{
    echo "gpu_check finished in $(($(date +%s) - START)) s (exit codes; 124 = timed out)"
    for part in packages bench_fp32 bench_bf16 bench_fp32_lowmem train_bf16 train_bf16_clean; do
        echo "$part: ${RC[$part]:-not run}"
    done
    grep -hE "^(source|warmup|self_training): official" "$OUT"/bench_*.txt 2>/dev/null
    grep -hE "test/(mAP|Rank-1)" "$OUT/train_bf16.log" 2>/dev/null | tail -n 4
} | tee "$OUT/summary.txt"

sleep 1  # let tee flush the log
