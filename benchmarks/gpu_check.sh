#!/usr/bin/env bash
# On a lent CUDA machine, from the repository root, in under 10 minutes:
#     bash benchmarks/gpu_check.sh            (extra arguments go to gpu_check.py)
# 1. JIT-builds zerofx's CUDA kernels (torch.utils.cpp_extension, sm_90 unless
#    TORCH_CUDA_ARCH_LIST says otherwise) and checks Adam, AdamW and LAMB on the GPU against
#    the plain-torch reference on the CPU (fp32/bf16/fp16 gradients, weight copies, skip),
#    then times the fused Adam step against a device copy (benchmarks/gpu_check.py).
# 2. Trains the main job's model on the GPU with zerofx (bf16, the fused kernels) and with
#    torch.compile + autocast + fused AdamW, same weights and batches: tokens/s, losses and
#    peak memory side by side (benchmarks/gpu_train.py; exit 1 if they do not train alike).
# 3. Trains the same model with offload_optimizer {device: cpu} (ZeRO-Offload: fp32 state in
#    pinned host memory, the step on the CPU kernels) and in memory, same weights and
#    batches: same bits or the worst difference, tokens/s, peak device memory
#    (benchmarks/gpu_check.py --offload; exit 1 beyond the kernels' tolerance).
# Run on an H200 (torch 2.11.0+cu130) on 2026-12-04: benchmarks/RESULTS.md has its numbers.
# Here they run with --device cpu (tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 300 python3 benchmarks/gpu_check.py "$@"
timeout 150 python3 benchmarks/gpu_train.py --steps 300
timeout 200 python3 benchmarks/gpu_check.py --offload
