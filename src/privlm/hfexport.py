"""`privlm export-hf RUN_DIR OUT_DIR`: a run's checkpoint as a directory `transformers` loads.

* the GPT-2 baseline (SM+LN+G with biases, tied head, every FFN) becomes a plain ``GPT2LMHeadModel``
  (weights mapped by `privlm.model.hf`), loadable with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``;
* every other preset becomes a ``PrivlmConfig`` / ``PrivlmForCausalLM`` pair (the two files of
  ``privlm/model/hf_remote`` copied next to the weights, ``auto_map`` in config.json), loadable with
  ``from_pretrained(OUT_DIR, trust_remote_code=True)``. The wrapper holds privlm's own ``GPT``, so there is
  one model definition and the ``privlm`` package must be installed where it is loaded.

Both carry the run's tokenizer (``PreTrainedTokenizerFast``). OUT_DIR must not exist or be empty (and not be
a symbolic link); the export is written to a temporary sibling ``.OUT_DIR.privlm-export-XXXXXXXX.tmp`` and
renamed, so nothing is overwritten or left half-written: a failure (disk full, an exception) removes the
temporary directory, and the temporary directories of exports that were killed are removed by the next export
into the same parent directory (only these names, and only when no live export holds their lock). Files get the
user's umask.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from privlm.errors import CheckpointError
from privlm.fileio import path_state, use_umask
from privlm.validate import read_json

REMOTE_DIR = Path(__file__).parent / "model" / "hf_remote"
REMOTE_FILES = ("configuration_privlm.py", "modeling_privlm.py")
TMP_MARK = ".privlm-export-"  # in the name of every temporary export directory (and of nothing else)
AUTO_MAP = {"AutoConfig": "configuration_privlm.PrivlmConfig",
            "AutoModelForCausalLM": "modeling_privlm.PrivlmForCausalLM"}


def is_gpt2_baseline(cfg) -> bool:
    from privlm.model.hf import check_baseline

    try:
        check_baseline(cfg)
    except ValueError:
        return False
    return True


def _gpt2(model, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from privlm.model.hf import to_hf_state_dict

    cfg = model.config
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ffn_hidden,
                        activation_function="gelu_new", layer_norm_epsilon=cfg.layer_norm_eps,
                        initializer_range=cfg.init_std, embd_pdrop=cfg.embd_dropout, attn_pdrop=0.0,
                        resid_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_cfg)
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"GPT-2 export: weights do not map ({(result.missing_keys + result.unexpected_keys)[:3]})")
    return hf.eval()


def _remote(model, eos_id: int):
    from privlm.model.hf_remote.configuration_privlm import PrivlmConfig
    from privlm.model.hf_remote.modeling_privlm import PrivlmForCausalLM

    config = PrivlmConfig(privlm=dataclasses.asdict(model.config), auto_map=AUTO_MAP,
                          architectures=["PrivlmForCausalLM"], bos_token_id=eos_id, eos_token_id=eos_id)
    hf = PrivlmForCausalLM(config)
    hf.gpt.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def _lock_dir(path: Path, blocking: bool = True) -> int | None:
    """An flock on a directory (held by the export writing it; a killed export's lock is gone with it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_stale_exports(parent: Path) -> list[Path]:
    """Remove the temporary directories that killed exports left in ``parent`` (``.NAME.privlm-export-*.tmp``
    directories that no live export holds locked); links and every other name are left alone."""
    removed = []
    for p in sorted(Path(parent).glob(f".*{TMP_MARK}*.tmp")):
        st = path_state(p)
        if st is None or not os.path.isdir(p) or os.path.islink(p):
            continue
        try:
            fd = _lock_dir(p, blocking=False)
        except OSError:
            continue
        if fd is None:  # an export in progress
            continue
        try:
            shutil.rmtree(p)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the run's model and tokenizer to ``out_dir`` in transformers' format; returns what was written."""
    from transformers import PreTrainedTokenizerFast

    from privlm.run import load_run

    out = Path(out_dir)
    if out.is_symlink():
        raise CheckpointError(f"'{out}' is a symbolic link; give a new directory (nothing was written)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"'{out}' already exists and is not an empty directory; nothing was written")
    run = load_run(run_dir)
    manifest = run.path / "data_manifest.json"
    eos = read_json(manifest)["tokenizer"].get("eos_token") if manifest.is_file() else None
    eos = eos or "<|endoftext|>"
    eos_id = run.tokenizer.token_to_id(eos)
    baseline = is_gpt2_baseline(run.cfg.model)
    hf = _gpt2(run.model, eos_id) if baseline else _remote(run.model, eos_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{TMP_MARK}", suffix=".tmp"))
    lock = _lock_dir(tmp)
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        if not baseline:
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_DIR / name, tmp / name)
        PreTrainedTokenizerFast(tokenizer_object=run.tokenizer, eos_token=eos,
                                model_max_length=run.cfg.model.block_size).save_pretrained(tmp)
        use_umask(tmp)  # safetensors writes 0600 files, mkdtemp a 0700 directory
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return {"run": str(run.path), "out": str(out), "preset": run.cfg.model.preset,
            "class": type(hf).__name__, "trust_remote_code": not baseline}


def max_logit_difference(run_dir: str | Path, out_dir: str | Path, T: int = 16) -> float:
    """Largest |logit| difference between the run's model and the exported one on random tokens (a check
    for the export, run by `privlm export-hf` after writing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from privlm.run import load_run

    run = load_run(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=not is_gpt2_baseline(run.cfg.model))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, run.cfg.model.vocab_size, (2, min(T, run.cfg.model.block_size)), generator=gen)
    with torch.no_grad():
        return float((run.model(idx).logits - hf.eval()(input_ids=idx).logits).abs().max())


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars on stderr: the command prints its own lines
    try:
        info = export_hf(args.run_dir, args.out_dir)
        err = max_logit_difference(args.run_dir, args.out_dir)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    loader = (f"AutoModelForCausalLM.from_pretrained('{info['out']}'"
              + (", trust_remote_code=True)  # needs privlm installed" if info["trust_remote_code"] else ")"))
    print(f"wrote {info['out']} ({info['preset']} as {info['class']}); max |logit difference| = {err:.2e}\n"
          f"load with: {loader}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="privlm run directory")
    p.add_argument("out_dir", help="new (or empty) directory to write")
    p.set_defaults(func=run)
