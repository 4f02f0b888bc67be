#!/usr/bin/env bash
# The GPU step-time check: ResNet-18 (BatchNorm, ill-conditioned head), batch
# 128, random CIFAR-shaped data, in one process: SGD, Adam, the published and
# the recommended KWNG at M=5 and M=20 (its default: T from 32 of the 128
# samples) with their floors, and the recommended M=5 stacked, with T from
# the whole batch, with the VJPs as vmap or lax.map, and with
# update_every=10 (speed.py's default rows).
#
# Run from the repository root on a machine whose python3 has jax (CUDA),
# flax, optax, tqdm and matplotlib: `bash benchmarks/gpu_speed.sh`. About 5
# minutes on an H100/H200, mostly the 14 compilations. Writes
# $OUT/speed_gpu.json (+ .png, the log and nvidia-smi's card name); speed.py
# rewrites the JSON after every round, so a run cut short keeps what it
# measured.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/speed}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c 'import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'
timeout 480 python3 benchmarks/speed.py --model resnet18 --batch-size 128 \
  --steps 20 --rounds 3 --warmup 5 --out "$OUT" 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s]$' | tee "$OUT/speed_gpu.log"
