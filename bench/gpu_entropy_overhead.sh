#!/usr/bin/env bash
# Entropy regularizer overhead on one CUDA GPU: GPT-2 small (12 layers, d 768, 12 heads, vocab 50257), bf16
# autocast, T = 512 and 2048, 16384 tokens per step; memory at T = 2048. Writes
# bench/results/entropy_overhead_cuda_<gpu>.md named after the device. Run from the repository root:
#     bash bench/gpu_entropy_overhead.sh            (about 5-8 minutes on an H100-class GPU)
# First it prints the fused entropy kernels' one-time self-check on the GPU (privlm.model.entropy_attention.self_check,
# the check training runs at first use) and stops if it failed (training would fall back to the explicit path),
# then runs the kernels' correctness tests (values and gradients against an explicit float64 reference, bf16
# error bound), so a timing is never recorded for a wrong CUDA path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src"
PY=${PYTHON:-.venv/bin/python}
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
"$PY" - <<'PYEOF'
import sys
import torch
from privlm.model.attention import causal_softmax, row_entropy
from privlm.model.entropy_attention import attention_with_entropy, self_check

check = self_check(torch.device("cuda"))
print(check.message, flush=True)
if not check.ok:
    sys.exit("the fused entropy self-check failed on this GPU: training uses the explicit path here; no timing")

g = torch.Generator(device="cuda").manual_seed(0)
for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
    for T in (1, 37, 130, 1000):
        q, k, v = (torch.randn(2, 12, T, 64, device="cuda", generator=g) for _ in range(3))
        q = (q / 8).requires_grad_(); k.requires_grad_(); v.requires_grad_()
        y, h = attention_with_entropy(q.to(dtype), k.to(dtype), v.to(dtype))
        p = causal_softmax(q.double() @ k.double().transpose(-2, -1))
        h_ref, y_ref = row_entropy(p), p @ v.double()
        w = torch.randn(h.shape, device="cuda", generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((h.double() * w).sum() + y.double().sum(), (q, k, v))
        gb = torch.autograd.grad((h_ref * w).sum() + y_ref.sum(), (q, k, v))
        err = max([(h.double() - h_ref).abs().max().item(), (y.double() - y_ref).abs().max().item()]
                  + [((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item() for a, b in zip(ga, gb)])
        print(f"cuda {dtype} T={T}: max error {err:.2e} (tolerance {tol})")
        assert err < tol, "the CUDA fused entropy path disagrees with the explicit reference"
PYEOF
"$PY" bench/entropy_overhead.py --device cuda --dtype bf16 --layers 12 --vocab 50257 --seq 512 2048 \
    --tokens 16384 --reps 7 --steps 5 --official-max-T 2048 --mem-seq 2048 \
    --out "bench/results/entropy_overhead_cuda_${gpu}.md"
