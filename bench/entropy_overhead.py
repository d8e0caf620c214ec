"""Cost of the entropy regularizer per training step (time and memory), privlm and HF, beside the official approach.

    PYTHONPATH=src .venv/bin/python bench/entropy_overhead.py --out bench/results/entropy_overhead.md

Model: GPT-2-small width (d=768, 12 heads), ``--layers`` blocks (default 2 on CPU; 12 = GPT-2 small) and a
``--vocab`` vocabulary (default 8192 on CPU; 50257 = GPT-2); ``--tokens`` tokens per step (B = tokens / T, at
least 1). One step = forward, loss, backward, AdamW step. Variants:

  ours/plain     privlm GPT, preset SM+LN+G, CE only (F.scaled_dot_product_attention)
  ours/reg       same, output_entropy=True (fused entropy attention), CE + lambda * EntropyRegularizer
  ours-t/plain   privlm GPT, preset SM(t)+ScFuFFN, CE only
  ours-t/reg     same with the regularizer
  hf/sdpa        transformers GPT2LMHeadModel, same shape, attn_implementation="sdpa", CE only
  hf/fused       the same model under privlm.entropy.hf.record_entropy (the EntropyRegularizedTrainer path):
                 privlm's fused entropy attention through transformers' AttentionInterface, CE + lambda * L_ent
  hf/eager       attn_implementation="eager", CE only
  hf/official    eager + output_attentions=True + the official per-head regularizer loop
                 (entropy_regularization.py, reimplemented below with per-layer thresholds)

Timing: every variant is built up front and timed in interleaved rounds (round r times every variant once,
``--steps`` steps each), so machine noise hits all of them alike; a ratio is the median over rounds of the
per-round ratio [min, max]. On CPU both wall time and process CPU time are reported (the CPU clock is the less
sensitive one on a shared machine); the load average is recorded before and after.

Memory (each variant in a fresh process, at each ``--mem-seq`` length):
  * saved for backward: every tensor autograd saves during the forward, deduplicated by storage -- exact;
  * step peak: how far one step raises the high-water mark above the memory held before it (CPU: VmHWM reset
    through /proc/self/clear_refs after a warm-up step; CUDA: torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

D, H = 768, 12  # GPT-2 small width
LAMBDA, GAMMA = 1e-5, 0.2
ARGS = argparse.Namespace(layers=2, vocab=8192, device="cpu", dtype="fp32")


# ------------------------------------------------------------------------------------------- variants
def official_entropy_regularization(attentions, thresholds, context_size, fraction=GAMMA, loss_coeff=LAMBDA):
    """The official repository's entropy_regularization: per layer, per head, with the per-layer thresholds of
    the paper's appendix (not usage_example.py's reuse of layer 0's)."""
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


def device() -> torch.device:
    return torch.device(ARGS.device)


def sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


def autocast():
    if ARGS.dtype == "bf16":
        return torch.autocast(device().type, dtype=torch.bfloat16)
    return nullcontext()


class Variant:
    def __init__(self, name: str, T: int, B: int):
        from privlm.config import RegConfig
        from privlm.entropy import EntropyRegularizer

        torch.manual_seed(0)
        L, V = ARGS.layers, ARGS.vocab
        self.name, self.T, self.B = name, T, B
        self.idx = torch.randint(0, V, (B, T), device=device())
        self.targets = torch.randint(0, V, (B, T), device=device())
        self.reg = self.thresholds = None
        extra: list[torch.nn.Parameter] = []
        if name.startswith("ours"):
            from privlm.config import load_config
            from privlm.model.gpt import GPT

            preset = "SM(t)+ScFuFFN" if name.startswith("ours-t") else "SM+LN+G"
            cfg = load_config(preset, [f"model.n_layer={L}", f"model.n_embd={D}", f"model.n_head={H}",
                                       f"model.vocab_size={V}", f"model.block_size={T}", f"data.seq_len={T}",
                                       "reg.enabled=true"])
            self.model = GPT(cfg.model)
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            impl = "eager" if name in ("hf/eager", "hf/official") else "sdpa"
            hcfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, attn_pdrop=0.0,
                              resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
            self.model = GPT2LMHeadModel._from_config(hcfg, attn_implementation=impl)
            if name == "hf/fused":
                from privlm.entropy.hf import use_entropy_attention

                use_entropy_attention(self.model)
            if name == "hf/official":
                self.thresholds = torch.nn.ParameterList(torch.nn.Parameter(torch.full((H,), 0.5)) for _ in range(L))
                extra = list(self.thresholds.to(device()).parameters())
        if name.endswith("/reg") or name == "hf/fused":
            self.reg = EntropyRegularizer(L, H, T, RegConfig(enabled=True, lambda_=LAMBDA, gamma=GAMMA)).to(device())
            extra = list(self.reg.parameters())
        self.model.to(device()).train()
        self.opt = torch.optim.AdamW(list(self.model.parameters()) + extra, lr=1e-4)

    def loss(self, idx, targets):
        V = ARGS.vocab
        with autocast():
            if self.name.startswith("ours"):
                out = self.model(idx, targets, output_entropy=self.reg is not None)
                if self.reg is None:
                    return out.loss
                l_ent = self.reg(out.entropy, idx.shape[1])
                return out.loss + LAMBDA * l_ent
            if self.name == "hf/fused":
                from privlm.entropy.hf import record_entropy

                with record_entropy(self.model) as rec:
                    out = self.model(idx)
                ce = F.cross_entropy(out.logits.float().view(-1, V), targets.reshape(-1))
                l_ent = self.reg(rec.entropy, idx.shape[1])
                return ce + LAMBDA * l_ent
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


VARIANTS = ("ours/plain", "ours/reg", "ours-t/plain", "ours-t/reg", "hf/sdpa", "hf/fused", "hf/eager", "hf/official")
RATIOS = (("ours/reg", "ours/plain"), ("ours-t/reg", "ours-t/plain"), ("hf/fused", "hf/sdpa"),
          ("hf/official", "hf/sdpa"), ("hf/official", "hf/eager"))


# ------------------------------------------------------------------------------------------- timing
def time_all(T: int, B: int, reps: int, steps: int, names) -> tuple[dict, dict]:
    variants = {n: Variant(n, T, B) for n in names}
    for v in variants.values():  # warm-up: allocator, AdamW state, kernels
        v.step()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
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


def memory_child(name: str, T: int, B: int) -> dict:
    """In a fresh process: saved-for-backward bytes and the step's peak above the memory held before it."""
    v = Variant(name, T, B)
    v.step(v.idx[:, :8], v.targets[:, :8])  # AdamW state and allocator warm-up at a negligible size
    if device().type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        v.step()
        sync()
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = _status_kib("VmRSS") * 1024
        v.step()
        peak = _status_kib("VmHWM") * 1024
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == device().type:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v.loss(v.idx, v.targets)
    return {"saved_bytes": sum(seen.values()), "step_peak_bytes": peak - base, "base_bytes": base}


def memory(name: str, T: int, B: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, "--T", str(T), "--B", str(B), "--threads", str(threads),
           "--device", ARGS.device, "--dtype", ARGS.dtype, "--layers", str(ARGS.layers), "--vocab", str(ARGS.vocab)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": f"exit {res.returncode}: {tail[:120]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noisy)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=1, help="training steps per variant per round")
    ap.add_argument("--seq", type=int, nargs="*", default=[128, 512, 2048, 4096], help="timed lengths (none: skip)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (B = tokens / T, at least 1)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--official-max-T", type=int, default=2048,
                    help="time the HF eager/official variants only up to this T (their T x T weights)")
    ap.add_argument("--mem-seq", type=int, nargs="*", default=[4096])
    ap.add_argument("--mem-jobs", type=int, default=1, help="memory subprocesses run at once (each is measured alone)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast for every variant")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ARGS.layers, ARGS.vocab, ARGS.device, ARGS.dtype = args.layers, args.vocab, args.device, args.dtype
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.T, args.B)))
        return 0

    from privlm.hostinfo import describe_host

    cuda = device().type == "cuda"
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Entropy regularizer overhead ({torch.cuda.get_device_name() if cuda else 'CPU'}, {args.dtype})", "",
             f"`PYTHONPATH=src {' '.join(['python'] + sys.argv)}`  ",
             f"{started}; torch {torch.__version__}; {describe_host()}; {args.threads} torch thread(s); "
             f"load average (1, 5, 15 min) at start: {load_average()}.  ",
             f"Model: d={D}, {H} heads, {args.layers} layers, vocab {args.vocab}; {args.tokens} tokens per step; "
             f"{args.reps} interleaved rounds x {args.steps} step(s); ratio = median of per-round ratios [min, max].",
             ""]
    if args.seq:
        lines += ["| T | B | clock | ours reg / plain (SM+LN+G) | ours reg / plain (SM(t)+ScFuFFN) | hf fused / sdpa | "
             "official / hf sdpa | official / hf eager | ms/step: ours plain, reg; ours-t plain, reg; "
                  "hf sdpa, fused, eager, official |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r: f"{r[0]:.3f}x [{r[1]:.2f}, {r[2]:.2f}]"  # noqa: E731
    verdicts = []
    for T in args.seq:
        B = max(1, args.tokens // T)
        names = [n for n in VARIANTS if T <= args.official_max_T or n not in ("hf/eager", "hf/official")]
        wall, cpu = time_all(T, B, args.reps, args.steps, names)
        for clock, times in ((("wall", wall),) if cuda else (("wall", wall), ("CPU", cpu))):
            ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            cells = [fmt(ratio(times, a, b)) if a in times and b in times else "not run" for a, b in RATIOS]
            lines.append(f"| {T} | {B} | {clock} | " + " | ".join(cells) + " | " +
                         "; ".join(", ".join(f"{ms[n]:.0f}" if n in ms else "-" for n in group) for group in
                                   (("ours/plain", "ours/reg"), ("ours-t/plain", "ours-t/reg"),
                                    ("hf/sdpa", "hf/fused", "hf/eager", "hf/official"))) + " |")
            print(lines[-1], flush=True)
            if clock == ("wall" if cuda else "CPU"):
                goal = 1.10 if T <= 512 else 1.25 if T <= 2048 else None
                for a, b in RATIOS[:3]:
                    r = ratio(times, a, b)[0]
                    if goal is not None:
                        verdicts.append(f"T={T} {a} / {b}: {r:.3f}x, goal <= {goal:.2f}x: "
                                        f"{'met' if r <= goal else 'MISSED'}")
    if args.seq:
        lines.append(f"\nLoad average at the end of the timing: {load_average()}.")
    for T in args.mem_seq:
        B = max(1, args.tokens // T)
        unit = "allocator" if cuda else "RSS"
        lines += ["", f"Memory of one training step at T={T}, B={B} (fresh process per variant; step peak = "
                  f"{unit} high-water mark of the step above what was held before it):", "",
                  "| variant | saved for backward (MiB) | step peak (MiB) | held before the step (MiB) |",
                  "|---|---|---|---|"]
        names = [n for n in VARIANTS if T <= args.official_max_T or n not in ("hf/eager", "hf/official")]
        with ThreadPoolExecutor(args.mem_jobs) as pool:  # threads only wait on the subprocesses
            mem = dict(zip(names, pool.map(lambda n: memory(n, T, B, args.threads), names)))
        for n, m in mem.items():
            if "error" in m:
                lines.append(f"| {n} | failed: {m['error']} | | |")
            else:
                lines.append(f"| {n} | {m['saved_bytes'] / 2**20:.1f} | {m['step_peak_bytes'] / 2**20:.1f} | "
                             f"{m['base_bytes'] / 2**20:.1f} |")
            print(lines[-1], flush=True)
        for a, b in RATIOS[:3]:
            if "error" in mem.get(a, {"error": 1}) or "error" in mem.get(b, {"error": 1}):
                continue
            inc = mem[a]["step_peak_bytes"] - mem[b]["step_peak_bytes"]
            share = inc / mem[b]["step_peak_bytes"]
            saved = (mem[a]["saved_bytes"] - mem[b]["saved_bytes"]) / mem[b]["saved_bytes"]
            verdicts.append(f"T={T} memory {a} vs {b}: step peak {inc / 2**20:+.1f} MiB = {100 * share:+.1f}% "
                            f"(saved for backward {100 * saved:+.1f}%), goal <= 5%: "
                            f"{'met' if share <= 0.05 else 'MISSED'}")
    lines += ["", "Against the goals (" + ("wall clock" if cuda else "CPU clock") + "):", ""]
    lines += [f"* {v}" for v in verdicts]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
