"""Training throughput of privlm's loop vs a minimal nanoGPT-style reference GPT of the same shape.

Both train on the same random token batches (throughput does not depend on the data), alternating runs in
one process so that machine load affects both alike; it prints tokens/s of each and their ratio, and on
CUDA the model FLOP utilization (MFU, PaLM-style 6N + 12·L·d·T FLOPs per token).

    python bench/train_throughput.py --config small                       # CPU, configs/cpu/small.yaml
    python bench/train_throughput.py --device cuda --config gpt2-small --seq-len 512 --dtype bf16
    python bench/train_throughput.py --config small --out bench/results/train_throughput_cpu.md

privlm's side is the real training step (`Trainer.step_once`: micro-batches from its batch schedule,
autocast, clipping, fused AdamW with the paper's decay groups, schedule, divergence checks); the
reference is written below in nanoGPT style (fused qkv, SDPA, fused AdamW).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from privlm.config import load_config
from privlm.hostinfo import describe_host
from privlm.train import Trainer


# ------------------------------------------------------------------------------------------ reference GPT
class RefAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), RefAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.h = nn.ModuleList(RefBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class RefTrainer:
    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, batches: np.ndarray):
        m, t = cfg.model, cfg.train
        torch.manual_seed(0)
        self.model = RefGPT(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:
            self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
        self.device, self.dtype, self.batches, self.i = device, dtype, batches, 0
        self.b, self.accum, self.clip = t.batch_size, t.grad_accum, t.grad_clip
        self.model.train()

    def step_once(self):
        for _ in range(self.accum):
            rows = self.batches[(self.i * self.b) % (len(self.batches) - self.b):][: self.b]
            self.i += 1
            chunk = torch.from_numpy(rows.astype(np.int64)).to(self.device)
            y = torch.cat([chunk[:, 1:], torch.full_like(chunk[:, :1], -1)], dim=1)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.model(chunk, y)
            (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ------------------------------------------------------------------------------------------ harness
class RandomTokens:
    """Stands in for TokenData: random ids (throughput does not depend on what the tokens are)."""

    def __init__(self, n: int, T: int, vocab: int):
        from tokenizers import Tokenizer, models
        rng = np.random.default_rng(0)
        self.train = rng.integers(0, vocab, size=(n, T), dtype=np.int64).astype(np.uint32)
        self.valid = self.train[:8]
        self.vocab_size = vocab
        self.tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
        self.manifest = {"source": "random tokens (benchmark)"}


CONFIGS = {"small": "configs/cpu/small.yaml", "tiny": "configs/cpu/tiny.yaml", "demo": "configs/cpu/demo.yaml",
           "gpt2-small": "configs/paper/codeparrot-t128.yaml"}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0,
               "3090": 71.0}  # dense bf16/fp16 tensor-core peaks


def flops_per_token(n_params_non_embedding: int, L: int, d: int, T: int) -> float:
    """6N for the weight matmuls (forward + backward) + 12·L·d·T for attention scores and values."""
    return 6 * n_params_non_embedding + 12 * L * d * T


def timed(trainer_step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def machine() -> str:
    desc = f"{describe_host()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def append_record(out: str, script: str, argv, lines: list[str]) -> None:
    """Append one dated, self-describing result block (command, machine, printed lines) to ``out``."""
    cmd = f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `{cmd}`\n\n"
                 f"Machine: {machine()}\n\n```\n" + "\n".join(lines) + "\n```\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", help=f"one of {', '.join(CONFIGS)} or a YAML path / preset")
    ap.add_argument("--preset", default=None, help="override model.preset (default: the config's, SM+LN+G)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: fp32 CPU, bf16 CUDA")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the config's data.vocab_size (50257 "
                    "for the paper configs, whose tokenizer is pretrained)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run")
    ap.add_argument("--rounds", type=int, default=5, help="alternating runs of each implementation")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each before timing")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU on an unlisted GPU")
    ap.add_argument("--out", default=None, help="append a markdown result section to this file")
    args = ap.parse_args(argv)

    spec = CONFIGS.get(args.config, args.config)
    dtype_name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", None: "auto"}[args.dtype]
    over = ["model.embd_dropout=0.0",  # the reference has no dropout: same computation on both sides
            f"train.device={args.device}", f"train.dtype={dtype_name}", f"train.grad_accum={args.grad_accum}",
            "train.max_steps=100000", "train.log_every=100000", "train.eval_every=100000",
            "train.save_every=100000", "train.entropy_every=100000", f"train.compile={args.compile}"]
    if args.preset:
        over.append(f"model.preset={args.preset}")
    if args.seq_len:
        over += [f"data.seq_len={args.seq_len}", f"model.block_size={args.seq_len}"]
    if args.batch_size:
        over.append(f"train.batch_size={args.batch_size}")
    cfg = load_config(spec, over)
    vocab = args.vocab_size or (cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 50257)
    cfg.model.vocab_size = vocab
    T, b = cfg.data.seq_len, cfg.train.batch_size
    data = RandomTokens(max(64, 4 * b * args.grad_accum * (args.warmup + args.steps)), T, vocab)

    with tempfile.TemporaryDirectory() as tmp:
        ours = Trainer(cfg, Path(tmp) / "run", quiet=True, data=data)
        ours.net.train()
        ref = RefTrainer(cfg, ours.precision.device, ours.precision.dtype, data.train)
        if args.compile:
            ref.model = torch.compile(ref.model)
        device = ours.precision.device
        tokens_per_step = b * args.grad_accum * T
        print(f"# {cfg.model.preset} L{cfg.model.n_layer} d{cfg.model.n_embd} H{cfg.model.n_head} T{T} "
              f"V{vocab}, batch {b} x accum {args.grad_accum}, {device} "
              f"{str(ours.precision.dtype).replace('torch.', '')}; privlm {ours.model.num_params():,} params, "
              f"reference {sum(p.numel() for p in ref.model.parameters()):,}")
        for _ in range(args.warmup):
            ours.step_once()
            ref.step_once()
        rates = {"privlm": [], "reference": []}
        for r in range(args.rounds):
            order = (("privlm", ours.step_once), ("reference", ref.step_once))
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                rates[name].append(args.steps * tokens_per_step / timed(fn, args.steps, device))
        ours.close()

    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["privlm"] / med["reference"]
    lines = [f"privlm    {med['privlm']:>12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in rates['privlm'])})",
             f"reference {med['reference']:>12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in rates['reference'])})",
             f"ratio privlm/reference = {ratio:.3f}  (median of {args.rounds} alternating runs of {args.steps} steps)"]
    if device.type == "cuda":
        n_non_emb = ours.model.num_params() - ours.model.wpe.weight.numel() - ours.model.wte.weight.numel()
        fpt = flops_per_token(n_non_emb + ours.model.wte.weight.numel(), cfg.model.n_layer, cfg.model.n_embd, T)
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            for who in ("privlm", "reference"):
                lines.append(f"MFU {who}: {med[who] * fpt / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s "
                             f"({fpt / 1e6:.1f} MFLOP/token incl. the LM head)")
        else:
            lines.append(f"MFU: unknown peak for '{name}'; pass --peak-tflops")
    print("\n".join(lines))
    if args.out:
        append_record(args.out, "train_throughput.py", argv, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
