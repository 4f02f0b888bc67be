#!/usr/bin/env bash
# The GPU step-time check of issue 4: ResNet-18 (BatchNorm, ill-conditioned
# head), batch 128, random CIFAR-shaped data; SGD, Adam, KWNG M=5/10/20 (the
# published chain), the same with update_every=10 and with T from 32 of the
# 128 samples (jacobian_samples=32 with jacobian_outputs_fn), in one process.
#
# Run from the repository root on a machine whose python3 has jax (CUDA),
# flax, optax, tqdm and matplotlib: `bash benchmarks/gpu_speed.sh`. About 4
# minutes on an H100/H200, mostly the 11 compilations. Writes
# $OUT/speed_gpu.json (+ .png, the log and nvidia-smi's card name); speed.py
# rewrites the JSON after every round, so a run cut short keeps what it
# measured.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/speed}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c 'import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'
timeout 300 python3 benchmarks/speed.py --model resnet18 --batch-size 128 \
  --steps 20 --rounds 3 --warmup 5 --out "$OUT" \
  --kwng-variant update_every=10 --kwng-variant jacobian_samples=32 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s]$' | tee "$OUT/speed_gpu.log"
