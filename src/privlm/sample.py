"""`privlm sample RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature X] [--top-k K] [--seed S]`"""
from __future__ import annotations

import argparse
import math

import torch

from privlm.config import ConfigError
from privlm.errors import finite_float


def sample_text(run_dir: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0, device: str = "cpu") -> str:
    from privlm.run import load_run

    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be >= 0")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k <= 0:
        raise ConfigError(f"--top-k={top_k} must be positive")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes in argv arrive as lone surrogates
        raise ConfigError(f"--prompt is not valid UTF-8 text (undecodable byte at character {exc.start}); "
                          f"pass the prompt in UTF-8") from None
    run = load_run(run_dir, device)
    ids = run.tokenizer.encode(prompt).ids
    if not ids:
        raise ConfigError("--prompt is empty after tokenization; give at least one character")
    # the model only saw contexts of T tokens in training: never condition on more
    run.model.config.block_size = min(run.model.config.block_size, run.cfg.data.seq_len)
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = run.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return run.tokenizer.decode(out[0].tolist())


def run(args: argparse.Namespace) -> int:
    print(sample_text(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                      args.device))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a run's checkpoint", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=finite_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.set_defaults(func=run)
