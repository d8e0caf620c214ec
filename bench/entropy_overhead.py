"""Cost of the entropy regularizer per training step, ours vs the official approach, on CPU.

    .venv/bin/python bench/entropy_overhead.py [--threads 1] [--reps 7] [--out bench/results/entropy_overhead.md]

Shape: the CPU "small" model (L=4, d=256, H=4, vocab 8192), tokens per step fixed at 2048
(B=16 at T=128, B=4 at T=512). One step = forward, loss, backward, AdamW step. Variants:

  ours/plain    privlm GPT (preset SM+LN+G; and SM(t)+ScFuFFN), F.scaled_dot_product_attention, CE only
  ours/reg      same model, output_entropy=True (entropy inside the attention from its probabilities),
                CE + lambda * EntropyRegularizer (paper reduction)
  hf/sdpa       transformers GPT2LMHeadModel, same shape, attn_implementation="sdpa", CE only
  hf/eager      the same with attn_implementation="eager", CE only
  hf/official   eager + output_attentions=True + the official per-head regularizer loop
                (entropy_regularization.py, reimplemented below with per-layer thresholds)

Timing (wall clock and process CPU time): all variants are built up front and timed in interleaved rounds (round r times every variant once,
``--steps`` steps each), so machine noise hits all of them alike; each ratio is the median over rounds of
the per-round ratio. Memory at T=1024 is measured two ways, each variant in a fresh subprocess:
  * saved-for-backward bytes: every tensor autograd saves during the forward, deduplicated by storage
    (torch.autograd.graph.saved_tensors_hooks) -- exact and allocator-independent;
  * peak RSS increase of one training step: the kernel's high-water mark (VmHWM) is reset to the current RSS
    after setup and a T=8 warm-up step (/proc/self/clear_refs), then read after the step (tracemalloc does not
    see torch's allocations; ru_maxrss cannot be reset). On CUDA: torch.cuda.max_memory_allocated increase.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

L, D, H, V = 4, 256, 4, 8192
TOKENS_PER_STEP = 2048
LAMBDA, GAMMA = 1e-5, 0.2


# ------------------------------------------------------------------------------------------- variants
def official_entropy_regularization(attentions, thresholds, context_size, fraction=GAMMA, loss_coeff=LAMBDA):
    """The official repository's entropy_regularization (SPEC §3.2): per layer, per head, with the
    per-layer thresholds of the paper's App. B (not usage_example.py's reuse of layer 0's)."""
    e_max = math.log(context_size)
    tol = fraction * e_max
    total = 0.0
    for layer_idx, attn in enumerate(attentions):
        ent_val = -torch.nansum(attn * torch.log(attn + 1e-9), dim=-1)  # [B, H, T]
        layer_reg = 0.0
        for h in range(attn.shape[1]):
            delta = ent_val[:, h, :] - thresholds[layer_idx][h] * e_max
            penalty = torch.square(torch.where(delta.abs() > tol, delta, torch.zeros_like(delta)))
            layer_reg = layer_reg + penalty.sum()
        total = total + layer_reg / attn.shape[1]
    return loss_coeff * total / len(attentions)


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    def __init__(self, name: str, T: int, B: int, preset: str = "SM+LN+G"):
        torch.manual_seed(0)
        self.name, self.T, self.B = name, T, B
        self.idx = torch.randint(0, V, (B, T), device=DEVICE)
        self.targets = torch.randint(0, V, (B, T), device=DEVICE)
        if name.startswith("ours"):
            from privlm.config import load_config
            from privlm.entropy import EntropyRegularizer
            from privlm.model.gpt import GPT

            cfg = load_config(preset, [f"model.n_layer={L}", f"model.n_embd={D}", f"model.n_head={H}",
                                       f"model.vocab_size={V}", f"model.block_size={max(T, 1024)}",
                                       f"data.seq_len={T}", "reg.enabled=true"])
            self.model = GPT(cfg.model)
            self.reg = EntropyRegularizer(L, H, T, cfg.reg) if name == "ours/reg" else None
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            impl = "sdpa" if name == "hf/sdpa" else "eager"
            hcfg = GPT2Config(vocab_size=V, n_positions=max(T, 1024), n_embd=D, n_layer=L, n_head=H,
                              attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
            self.model = GPT2LMHeadModel._from_config(hcfg, attn_implementation=impl)
            self.thresholds = None
            if name == "hf/official":
                self.thresholds = torch.nn.ParameterList(torch.nn.Parameter(torch.full((H,), 0.5)) for _ in range(L))
                self.thresholds.to(DEVICE)
        self.model.to(DEVICE).train()
        if name == "ours/reg":
            self.reg.to(DEVICE)
            params = list(self.model.parameters()) + list(self.reg.parameters())
        elif name == "hf/official":
            params = list(self.model.parameters()) + list(self.thresholds.parameters())
        else:
            params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    def loss(self, idx, targets):
        if self.name == "ours/plain":
            return self.model(idx, targets).loss
        if self.name == "ours/reg":
            out = self.model(idx, targets, output_entropy=True)
            l_ent, _ = self.reg(out.entropy, idx.shape[1])
            return out.loss + LAMBDA * l_ent
        if self.name == "hf/official":
            out = self.model(idx, output_attentions=True)
            ce = F.cross_entropy(out.logits.float().view(-1, V), targets.reshape(-1))
            return ce + official_entropy_regularization(out.attentions, self.thresholds, idx.shape[1])
        out = self.model(idx)
        return F.cross_entropy(out.logits.float().view(-1, V), targets.reshape(-1))

    def step(self, idx=None, targets=None):
        loss = self.loss(self.idx if idx is None else idx, self.targets if targets is None else targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


VARIANTS = ("ours/plain", "ours/reg", "ours-t/plain", "ours-t/reg", "hf/sdpa", "hf/eager", "hf/official")


def make(name: str, T: int, B: int) -> Variant:
    if name.startswith("ours-t"):  # the model the regularizer is meant for: SM(t)+ScFuFFN
        v = Variant(name.replace("ours-t", "ours"), T, B, preset="SM(t)+ScFuFFN")
        v.name = name.replace("ours-t", "ours")
        return v
    return Variant(name, T, B)


# ------------------------------------------------------------------------------------------- timing
def time_all(T: int, reps: int, steps: int) -> dict[str, list[float]]:
    B = TOKENS_PER_STEP // T
    variants = {n: make(n, T, B) for n in VARIANTS}
    for v in variants.values():  # warm-up: allocator, AdamW state, kernels
        v.step()
        v.step()
    wall: dict[str, list[float]] = {n: [] for n in VARIANTS}
    cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for _ in range(reps):
        for n, v in variants.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                v.step()
            sync()
            cpu[n].append((time.process_time() - c0) / steps)
            wall[n].append((time.perf_counter() - w0) / steps)
    return wall, cpu


def ratio(times, a, b) -> tuple[float, float, float]:
    """Median, min and max over rounds of the per-round ratio a/b."""
    r = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(r), min(r), max(r)


# ------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS and return it (KiB). Without the reset,
    ru_maxrss would still hold the import-time peak (large for CUDA builds of torch) and hide the step's."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def read_peak_rss() -> int:
    return _status_kib("VmHWM")


def memory_child(name: str, T: int, B: int) -> dict:
    """Run in a fresh process: saved-for-backward bytes and peak-RSS increase of one step at T."""
    v = make(name, T, B)
    v.step(v.idx[:, :8], v.targets[:, :8])  # AdamW state and allocator warm-up at a negligible size
    if DEVICE.type == "cuda":  # the allocator's own peak counter
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1024
        v.step()
        sync()
        peak = torch.cuda.max_memory_allocated() / 1024
    else:
        base = reset_peak_rss()
        v.step()
        peak = read_peak_rss()
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == DEVICE.type:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = v.loss(v.idx, v.targets)
    saved = sum(seen.values())
    return {"saved_bytes": saved, "peak_rss_increase_bytes": (peak - base) * 1024}


def memory(name: str, T: int, B: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, "--T", str(T), "--B", str(B),
           "--threads", str(threads), "--device", DEVICE.type]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noisy)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="training steps per variant per round")
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--mem-T", type=int, default=1024)
    ap.add_argument("--mem-B", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: wall time with synchronization; memory = allocator peak increase")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.T, args.B)))
        return 0

    lines = [f"# Entropy regularizer overhead ({DEVICE.type.upper()})", "",
             f"`{' '.join(['python'] + sys.argv)}`  ", 
             f"torch {torch.__version__}, "
             f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
             f"{args.threads} torch thread(s); model L={L} d={D} H={H} vocab={V}; {TOKENS_PER_STEP} tokens/step; "
             f"{args.reps} interleaved rounds x {args.steps} steps; ratio = median of per-round ratios [min, max].",
             "Wall = elapsed time; CPU = process CPU time (insensitive to other processes on a shared machine; "
             "with one torch thread it is the work done).", "",
             "| T | B | clock | ours reg / plain (SM+LN+G) | ours reg / plain (SM(t)+ScFuFFN) | official / hf sdpa | "
             "official / hf eager | ms/step ours plain, reg | ms/step ours-t plain, reg | ms/step hf sdpa, eager, official |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r: f"{r[0]:.3f}x [{r[1]:.2f}, {r[2]:.2f}]"  # noqa: E731
    for T in args.seq:
        clocks = zip(("wall", "CPU"), time_all(T, args.reps, args.steps))
        for clock, times in (list(clocks)[:1] if DEVICE.type == "cuda" else clocks):
            ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            lines.append(f"| {T} | {TOKENS_PER_STEP // T} | {clock} | {fmt(ratio(times, 'ours/reg', 'ours/plain'))} | "
                         f"{fmt(ratio(times, 'ours-t/reg', 'ours-t/plain'))} | "
                         f"{fmt(ratio(times, 'hf/official', 'hf/sdpa'))} | {fmt(ratio(times, 'hf/official', 'hf/eager'))} | "
                         f"{ms['ours/plain']:.0f}, {ms['ours/reg']:.0f} | {ms['ours-t/plain']:.0f}, {ms['ours-t/reg']:.0f} | "
                         f"{ms['hf/sdpa']:.0f}, {ms['hf/eager']:.0f}, {ms['hf/official']:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", f"Memory of one training step at T={args.mem_T}, B={args.mem_B} (fresh process per variant):", "",
              "| variant | saved for backward (MiB) | "
              f"{'allocator peak' if DEVICE.type == 'cuda' else 'peak RSS'} increase of the step (MiB) |", "|---|---|---|"]
    for n in () if args.skip_memory else ("ours/plain", "ours/reg", "hf/sdpa", "hf/eager", "hf/official"):
        m = memory(n, args.mem_T, args.mem_B, args.threads)
        lines.append(f"| {n} | {m['saved_bytes'] / 2**20:.1f} | {m['peak_rss_increase_bytes'] / 2**20:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
