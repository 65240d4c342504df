#!/usr/bin/env bash
# The GPU path, measured in one go (under 8 minutes on one GPU): images/s of resnet32x2 DML and
# resnet32x4 -> resnet8x4 KD on CIFAR-size synthetic data (fp32, bf16, channels_last, compile; each
# peer alone vs in the topology; peak memory), the same DML pair on the ray engine with both peers
# colocated on the GPU, and the input pipeline fed from loader processes.
#
#   benchmarks/gpu.sh                         # on a GPU machine
#   benchmarks/gpu.sh --device cpu --steps 2  # smoke test: every part runs end to end on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=cuda; steps=50
args=("$@")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) shift ;;
  esac
done
python -c 'import torch, platform; print("torch", torch.__version__, "|", platform.machine(), "|",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
echo "== local engine: images/s per variant =="
python benchmarks/gpu.py "${args[@]}"
echo "== ray engine: colocated peers =="
python benchmarks/gpu.py --ray "${args[@]}"
echo "== input pipeline: prefetch vs resident batches =="
if [[ "$device" == cuda* ]]; then
  python benchmarks/input.py --device "$device" --threads 4 --workers 8 --rounds 3 --steps 12
else
  python benchmarks/input.py --device "$device" --rounds 1 --steps "$steps"
fi
