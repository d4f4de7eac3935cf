#!/usr/bin/env bash
# Every GPU check in one device call (the device tool's `run`; about 7 minutes of its 15):
#   1. the GPU tests (`pytest -m gpu`: each op, batch norm and conv primitive against finite
#      differences on CuPy, to second order),
#   2. W2 / W2fo on CuPy beside the peers on the same GPU (torch_loop with BENCH_DEVICE=cuda, JAX jit+vmap
#      at full float32 precision), checked against the float64 reference,
#   3. Omniglot 5-way 1-shot with the paper's settings (meta-batch 32, 15 queries) on CuPy for
#      GPU_TRAIN_MINUTES of training (default 3), then 600 test tasks.
# Everything is also written to $OUT (gpu_check.log, the Omniglot run's results.json and figures).
#
# The call carries the working tree, not the peer benchmark folder (BENCH_PEERS, by default
# ../shared/bench beside the clone) or the data: stage what the checks read, here, first
# (.devdata/ is git-ignored; about 25 MB):
#   mkdir -p .devdata/bench .devdata/data/omniglot
#   cp $BENCH_DATA/W2.npz $BENCH_DATA/ref_W2.npz $BENCH_DATA/ref_W2fo.npz .devdata/bench/
#   cp ${BENCH_PEERS:-../shared/bench/peers.py} .devdata/bench/
#   cp $MINIMAML_DATA/omniglot/images_*.zip .devdata/data/omniglot/
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".devdata"], timeout_s=600).
# GPU_CHECK_STAGES="tests bench train" picks stages (a rerun can skip what already ran);
# GPU_CHECK_DEVICE=cpu GPU_PYTHON=python GPU_VAL_EVERY=5 GPU_TRAIN_MINUTES=0.05 runs the same stages on
# the CPU, a dry run of this script (minutes).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
stages=${GPU_CHECK_STAGES:-tests bench train}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MINIMAML_DEVICE=${GPU_CHECK_DEVICE:-gpu}
python=${GPU_PYTHON:-python3}

if [[ $MINIMAML_DEVICE == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $python -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" || exit 1
fi

if [[ " $stages " == *" tests "* ]]; then
  echo "== GPU tests"
  timeout 180 $python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 25
fi

if [[ " $stages " == *" bench "* ]]; then
  echo "== W2 / W2fo on the GPU (median ms; ratio peer / minimaml)"
  BENCH_DATA=.devdata/bench BENCH_PEERS=.devdata/bench/peers.py BENCH_PYTHON=$(command -v $python) \
    BENCH_DEVICE=cuda JAX_DEFAULT_MATMUL_PRECISION=highest TF_CPP_MIN_LOG_LEVEL=2 \
    timeout 180 $python benchmarks/bench_w2.py --repeats 20 --rounds 1 --peers torch_loop,jax
fi

if [[ " $stages " == *" train "* ]]; then
  echo "== Omniglot 5-way 1-shot, full profile, ${GPU_TRAIN_MINUTES:-3} training minutes on $MINIMAML_DEVICE"
  MINIMAML_DATA=.devdata/data MINIMAML_CACHE=/tmp/minimaml-cache timeout 330 \
    $python -m minimaml.experiments.omniglot --profile full --val-every "${GPU_VAL_EVERY:-500}" \
    --max-train-minutes "${GPU_TRAIN_MINUTES:-3}" --out-dir "$out/omniglot-gpu" --no-progress
fi
