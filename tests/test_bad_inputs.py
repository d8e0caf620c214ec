"""Every bad input of every command ends with one line on stderr naming the problem, a non-zero exit, no
traceback and no file lost or changed.

Each case runs through the real `privlm` entry function (`privlm.cli.main`) in this process (fast: one set of
imports for all cases); `test_bad_inputs_in_a_real_subprocess` runs a sample of them as separate processes
through the console script. docs/bad-inputs.md is the table of these cases: regenerate it with
``PRIVLM_WRITE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py`` (a test checks it lists every case).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from privlm.cli import main
from small_corpus import stdlib_corpus_overrides

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"


@dataclass
class Case:
    id: str
    command: str  # the privlm subcommand the case belongs to (table grouping)
    what: str  # the bad input, in words
    argv: list[str]  # placeholders: {run} trained run, {copy} a fresh copy of it, {tmp} case dir, {ctx:<name>}
    expect: str  # regex the one stderr line must match
    setup: Optional[Callable[[Path, Path], None]] = None  # (copy, tmp) -> None, e.g. corrupt a file
    env: Optional[dict] = None


def _ckpt(run: Path) -> Path:
    return run / "state" / (run / "state" / "LATEST").read_text().strip()


def _write(rel: str, data: bytes | str) -> Callable[[Path, Path], None]:
    def setup(copy: Path, tmp: Path) -> None:
        target = (copy if not rel.startswith("tmp:") else tmp) / rel.removeprefix("tmp:")
        if "{ckpt}" in rel:
            target = _ckpt(copy) / rel.split("{ckpt}/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _shipped_profile(name: str, drop: Optional[str] = None) -> Callable[[Path, Path], None]:
    """TMP/p.json: a copy of a shipped cost profile, without the nonlinear op ``drop``."""
    def setup(copy: Path, tmp: Path) -> None:
        from privlm.pi.costs import load_profile
        raw = json.loads(Path(load_profile(name).path).read_text())
        raw["nonlinear"].pop(drop, None)
        (tmp / "p.json").write_text(json.dumps(raw))
    return setup


def _remove(rel: str) -> Callable[[Path, Path], None]:
    def setup(copy: Path, tmp: Path) -> None:
        (copy / rel).unlink()
    return setup


def _old_pickled_state(copy: Path, tmp: Path) -> None:
    """A checkpoint as written before the safetensors state format (optimizer.pt / rng.pt pickles)."""
    ckpt = _ckpt(copy)
    for new, old in (("optimizer.safetensors", "optimizer.pt"), ("rng.safetensors", "rng.pt")):
        (ckpt / new).unlink()
        (ckpt / old).write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1


def _dangling_latest(copy: Path, tmp: Path) -> None:
    (copy / "state" / "LATEST").write_text("step-99999999\n")


def _hold_lock(copy: Path, tmp: Path) -> None:
    from privlm.train.checkpoint import RunLock
    _HELD.append(RunLock(copy).acquire())


_HELD: list = []

BAD_JSONL = '{"content": "def f():\\n    return 1\\n"}\n{"content": oops}\n'
SWEEP_UNKNOWN_KEY = "name: s\nruns: [SM+LN+G]\nepochs: 3\n"
SWEEP_BAD_YAML = "name: s\nruns: [SM+LN+G\n"
SWEEP_BAD_OVERRIDE = "name: s\nruns: [SM+LN+G]\noverrides: [train.lr=nan]\n"

# --- the validation layer (issue 22): files of a run / sweep / model directory, sizes, bounds, values ------
def _json(rel: str, obj) -> Callable[[Path, Path], None]:
    return _write(rel, obj if isinstance(obj, (str, bytes)) else json.dumps(obj))


def _config(**changes) -> Callable[[Path, Path], None]:
    """Edit the copy's config.yaml: section__field=value."""
    def setup(copy: Path, tmp: Path) -> None:
        raw = yaml.safe_load((copy / "config.yaml").read_text())
        for key, value in changes.items():
            section, name = key.split("__")
            raw[section][name] = value
        (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    return setup


def _st_bytes(rel: str, header: bytes | dict, claim: Optional[int] = None, data: bytes = b"") -> Callable:
    """Replace a .safetensors file by an 8-byte length (``claim`` or the header's), a header and data."""
    def setup(copy: Path, tmp: Path) -> None:
        body = header if isinstance(header, bytes) else json.dumps(header).encode()
        n = len(body) if claim is None else claim
        target = _ckpt(copy) / rel.split("{ckpt}/", 1)[1] if "{ckpt}" in rel else copy / rel
        target.write_bytes(n.to_bytes(8, "little") + body + data)
    return setup


def _poison(value: float, rel: str = "model.safetensors") -> Callable[[Path, Path], None]:
    """One weight of the copy set to NaN or inf (the file stays a valid safetensors file)."""
    def setup(copy: Path, tmp: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file
        target = _ckpt(copy) / rel.split("{ckpt}/", 1)[1] if "{ckpt}" in rel else copy / rel
        with safe_open(str(target), "pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        name = sorted(k for k in tensors if k.endswith("weight"))[0]
        tensors[name].view(-1)[0] = value
        save_file(tensors, str(target), metadata=meta)
    return setup


def _deep(n: int) -> str:
    return "[" * n + "]" * n


BILLION_LAUGHS = "model:\n  preset: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  k{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
SWEEP_LAUGHS = "name: s\nruns: [SM+LN+G]\nx0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))


def _extra_tokens(copy: Path, tmp: Path) -> None:
    """A tokenizer.json with more tokens than the model's vocabulary (its ids would index past the embedding)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(copy / "tokenizer.json"))
    tok.add_tokens([f"<extra{i}>" for i in range(600)])
    tok.save(str(copy / "tokenizer.json"))


def _bad_token_cache(copy: Path, tmp: Path) -> None:
    """A private copy of the token cache whose validation ids lie outside the vocabulary."""
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    shutil.copytree(cfg["data"]["cache_dir"], tmp / "cache")
    cfg["data"]["cache_dir"] = str(tmp / "cache")
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    for f in (tmp / "cache").rglob("valid.bin"):
        f.write_bytes(b"\xff\xff" * (f.stat().st_size // 2))  # uint16 id 65535 >= 512


HF_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_head": 2, "n_embd": 16,
             "vocab_size": 64, "n_positions": 32, "n_ctx": 32, "bos_token_id": 0, "eos_token_id": 0}


def _hf(config: dict | str | None = None, weights: Optional[str] = None) -> Callable[[Path, Path], None]:
    """TMP/hf: a Hugging Face model directory (config.json = HF_CONFIG updated by ``config``; ``weights``:
    "nan" real weights with a NaN, "absurd" a safetensors header claiming 2^60 bytes)."""
    def setup(copy: Path, tmp: Path) -> None:
        d = tmp / "hf"
        d.mkdir()
        if weights in ("nan", "ok"):
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in HF_CONFIG.items() if k != "architectures"}))
            with torch.no_grad():
                if weights == "nan":
                    model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
            model.save_pretrained(d, safe_serialization=True)
        elif weights == "absurd":
            (d / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
        text = config if isinstance(config, str) else json.dumps({**HF_CONFIG, **(config or {})})
        (d / "config.json").write_text(text)
    return setup


M = "PRIVLM_MEMORY_LIMIT"
RUN_FILES = [
    # --- config.yaml of a run ------------------------------------------------------------------------
    Case("runcfg-string", "run files", "config.yaml that is a YAML string", ["eval", "{copy}"],
         r"config\.yaml' is not a valid privlm config: it must be a mapping of sections .*got a string",
         setup=_write("config.yaml", "just a sentence\n")),
    Case("runcfg-list", "run files", "config.yaml that is a list", ["sample", "{copy}", "--prompt", "x"],
         r"config\.yaml' is not a valid privlm config: it must be a mapping .*got a list",
         setup=_write("config.yaml", "- model\n- train\n")),
    Case("runcfg-number", "run files", "config.yaml that is a number", ["cost", "{copy}"],
         r"config\.yaml' is not a valid privlm config: .*got an integer", setup=_write("config.yaml", "42\n")),
    Case("runcfg-alias-bomb", "run files", "config.yaml with a billion-laughs alias bomb (10^9 values)",
         ["eval", "{copy}"], r"config\.yaml' expands to more than 200,000 values through its aliases",
         setup=_write("config.yaml", BILLION_LAUGHS)),
    Case("runcfg-alias-bomb-report", "run files", "the alias bomb read by report", ["report", "{copy}", "-o",
         "{tmp}/r.html"], r"expands to more than 200,000 values", setup=_write("config.yaml", BILLION_LAUGHS)),
    Case("runcfg-recursive-alias", "run files", "config.yaml whose anchor contains itself",
         ["eval", "{copy}"], r"config\.yaml' refers to itself through an alias",
         setup=_write("config.yaml", "model: &m\n  self: *m\n")),
    Case("runcfg-deep", "run files", "config.yaml nested 200 levels deep", ["eval", "{copy}"],
         r"config\.yaml' is nested deeper than 32 levels", setup=_write("config.yaml", "model: " + _deep(200))),
    Case("runcfg-very-deep", "run files", "config.yaml nested 10,000 levels deep (parser recursion)",
         ["entropy", "{copy}"], r"config\.yaml' is nested deeper than 32 levels",
         setup=_write("config.yaml", "model: " + _deep(10_000))),
    Case("runcfg-deep-block", "run files", "config.yaml of 40 nested block mappings", ["eval", "{copy}"],
         r"config\.yaml' is nested deeper than 32 levels",
         setup=_write("config.yaml", "".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v\n")),
    Case("runcfg-huge", "run files", "a 100 kB config.yaml", ["eval", "{copy}"],
         r"config\.yaml' is 100,003 bytes, more than the 65,536",
         setup=_write("config.yaml", "# " + "x" * 100_000 + "\n")),
    Case("runcfg-not-utf8", "run files", "config.yaml with bytes that are not UTF-8", ["eval", "{copy}"],
         r"config\.yaml' is not UTF-8 text", setup=_write("config.yaml", b"model:\n  preset: \xff\xfe\n")),
    Case("runcfg-python-tag", "run files", "config.yaml with a !!python/object tag (code execution attempt)",
         ["eval", "{copy}"], r"config\.yaml' is not valid YAML: could not determine a constructor",
         setup=_write("config.yaml", "model: !!python/object/apply:os.system ['true']\n")),
    Case("runcfg-section-list", "run files", "config.yaml whose model section is a list", ["eval", "{copy}"],
         r"config key 'model' is a section", setup=_write("config.yaml", "model: [1, 2]\n")),
    Case("runcfg-section-null-key", "run files", "config.yaml with a null key",
         ["eval", "{copy}"], r"not a valid privlm config: unknown config key 'None'",
         setup=_write("config.yaml", "~: 1\n")),
    Case("runcfg-n-layer-huge", "run files", "config.yaml with model.n_layer 10^9", ["cost", "{copy}"],
         r"model\.n_layer=1000000000 is too large \(at most 4,096", setup=_config(model__n_layer=10**9)),
    Case("runcfg-n-head-zero", "run files", "config.yaml with model.n_head 0", ["eval", "{copy}"],
         r"model\.n_head=0 must be a positive integer", setup=_config(model__n_head=0)),
    Case("runcfg-vocab-negative", "run files", "config.yaml with a negative vocabulary", ["sample", "{copy}",
         "--prompt", "x"], r"model\.vocab_size=-5 must be a positive integer", setup=_config(model__vocab_size=-5)),
    Case("runcfg-n-embd-string", "run files", "config.yaml with n_embd a string", ["eval", "{copy}"],
         r"model\.n_embd", setup=_config(model__n_embd="wide")),
    Case("runcfg-seed-huge", "run files", "config.yaml with train.seed 2^70", ["train", "--resume", "{copy}"],
         r"train\.seed=1180591620717411303424 is too large", setup=_config(train__seed=2**70)),
    Case("runcfg-is-dir", "run files", "config.yaml that is a directory", ["eval", "{copy}"],
         r"not a privlm run directory \(no config\.yaml\)",
         setup=lambda copy, tmp: ((copy / "config.yaml").unlink(), (copy / "config.yaml").mkdir())),
    Case("runcfg-empty-bytes", "run files", "config.yaml of NUL bytes", ["eval", "{copy}"],
         r"config\.yaml' is not valid YAML|control characters", setup=_write("config.yaml", b"\x00" * 64)),
    # --- summary.json / metrics.jsonl / entropy.json / flight_recorder.json / pi_measured.json -----------
    Case("summary-list", "run files", "summary.json that is a list", ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"summary\.json' is malformed: it must be a mapping \(got a list\)", setup=_json("summary.json", [])),
    Case("summary-steps-string", "run files", "summary.json with steps a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"summary\.json' is malformed: 'steps' must be an integer "
         r"\(got a string\)", setup=_json("summary.json", {"steps": "4"})),
    Case("summary-no-steps", "run files", "summary.json without steps", ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"summary\.json' is malformed: it lacks the field 'steps'", setup=_json("summary.json", {"preset": "x"})),
    Case("summary-ppl-string", "run files", "summary.json with final_ppl a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'final_ppl' must be a number or null",
         setup=_json("summary.json", {"steps": 4, "final_ppl": "low"})),
    Case("summary-diverged-string", "run files", "summary.json with diverged 'yes'",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'diverged' must be true/false",
         setup=_json("summary.json", {"steps": 4, "diverged": "yes"})),
    Case("summary-steps-bool", "run files", "summary.json with steps true", ["report", "{copy}", "-o",
         "{tmp}/r.html"], r"'steps' must be an integer \(got a boolean\)", setup=_json("summary.json", {"steps": True})),
    Case("summary-deep", "run files", "summary.json nested 100 levels", ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"summary\.json' is nested deeper than 32 levels", setup=_json("summary.json", _deep(100))),
    Case("summary-very-deep", "run files", "summary.json nested 10^6 levels (parser recursion)",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"summary\.json' is nested deeper than 32 levels",
         setup=_json("summary.json", _deep(10**6))),
    Case("summary-not-utf8", "run files", "summary.json in Latin-1", ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"summary\.json' is not UTF-8 text", setup=_write("summary.json", b'{"preset": "caf\xe9"}')),
    Case("summary-truncated", "run files", "summary.json cut mid-way", ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"summary\.json' is not valid JSON", setup=_write("summary.json", '{"steps": 4, "pres')),
    Case("metrics-line-list", "run files", "a metrics.jsonl record that is a list",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"metrics\.jsonl' line 1 is malformed: it must be a mapping",
         setup=_write("metrics.jsonl", '[1, 2]\n{"kind": "train", "step": 2}\n')),
    Case("metrics-step-string", "run files", "a metrics.jsonl record with step a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"metrics\.jsonl' line 2 is malformed: 'step' must be an integer",
         setup=_write("metrics.jsonl", '{"kind": "train", "step": 2}\n{"kind": "train", "step": "4"}\n')),
    Case("metrics-no-kind", "run files", "a metrics.jsonl record without kind",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"line 1 is malformed: it lacks the field 'kind'",
         setup=_write("metrics.jsonl", '{"step": 2, "loss": 1.0}\n')),
    Case("metrics-entropy-ragged", "run files", "an entropy record whose head_entropy rows differ in length",
         ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"'head_entropy' must be a rectangular list of lists of numbers or null",
         setup=_write("metrics.jsonl", '{"kind": "entropy", "step": 2, "head_entropy": [[1, 2], [1]]}\n')),
    Case("metrics-loss-string", "run files", "a train record with loss a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'loss' must be a number or null",
         setup=_write("metrics.jsonl", '{"kind": "train", "step": 2, "loss": "high"}\n')),
    Case("metrics-bad-middle", "run files", "metrics.jsonl with garbage on a middle line",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"metrics\.jsonl' line 2 is not valid JSON",
         setup=_write("metrics.jsonl", '{"kind": "train", "step": 2}\nGARBAGE\n{"kind": "train", "step": 4}\n')),
    Case("metrics-deep-line", "run files", "a metrics.jsonl line nested 10^5 levels",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"metrics\.jsonl' line 1 is nested deeper than 32 levels",
         setup=_write("metrics.jsonl", _deep(10**5) + "\n{\"kind\": \"train\", \"step\": 2}\n")),
    Case("metrics-not-utf8", "run files", "metrics.jsonl with a byte that is not UTF-8",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"metrics\.jsonl' is not UTF-8 text",
         setup=_write("metrics.jsonl", b'{"kind": "train", "step": 2, "x": "\xff"}\n')),
    Case("entropy-json-string", "run files", "entropy.json whose head_entropy is a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"entropy\.json' is malformed: 'head_entropy' must be",
         setup=_json("entropy.json", {"head_entropy": "flat"})),
    Case("entropy-json-ragged", "run files", "entropy.json with a ragged matrix",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'head_entropy' must be a rectangular list",
         setup=_json("entropy.json", {"head_entropy": [[1.0, 2.0], [3.0]]})),
    Case("entropy-json-list", "run files", "entropy.json that is a list", ["report", "{copy}", "-o", "{tmp}/r.html"],
         r"entropy\.json' is malformed: it must be a mapping", setup=_json("entropy.json", [[1.0]])),
    Case("entropy-json-thresholds", "run files", "entropy.json with thresholds of strings",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'thresholds' must be a rectangular list",
         setup=_json("entropy.json", {"head_entropy": [[1.0]], "thresholds": [["a"]]})),
    Case("flight-list", "run files", "flight_recorder.json that is a list",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"flight_recorder\.json' is malformed: it must be a mapping",
         setup=_json("flight_recorder.json", [])),
    Case("flight-records-string", "run files", "flight_recorder.json whose records are a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'records' must be a list",
         setup=_json("flight_recorder.json", {"format": "privlm-flight-recorder/1", "divergence_step": 3, "records": "many"})),
    Case("flight-record-no-step", "run files", "a flight record without step",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"lacks the field 'records\[0\]\.step'",
         setup=_json("flight_recorder.json", {"format": "privlm-flight-recorder/1", "divergence_step": 3, "records": [{"loss": 1}]})),
    Case("flight-step-float", "run files", "flight_recorder.json with divergence_step 3.5",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'divergence_step' must be an integer \(got a number\)",
         setup=_json("flight_recorder.json", {"format": "privlm-flight-recorder/1", "divergence_step": 3.5, "records": []})),
    Case("pi-measured-list", "run files", "pi_measured.json that is a list",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"pi_measured\.json' is malformed: it must be a mapping",
         setup=_json("pi_measured.json", [1])),
    Case("pi-measured-bytes-string", "run files", "pi_measured.json with bytes_total a string",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'bytes_total' must be a number or null",
         setup=_json("pi_measured.json", {"bytes_total": "lots"})),
    Case("manifest-list", "run files", "data_manifest.json that is a list (export-hf reads it)",
         ["export-hf", "{copy}", "{tmp}/hfout"], r"data_manifest\.json' is malformed: it must be a mapping",
         setup=_json("data_manifest.json", [])),
    Case("manifest-tokenizer-string", "run files", "data_manifest.json whose tokenizer is a string",
         ["export-hf", "{copy}", "{tmp}/hfout"], r"'tokenizer' must be a mapping",
         setup=_json("data_manifest.json", {"splits": {"train": {}, "valid": {}}, "tokenizer": "bpe"})),
    Case("manifest-resume-shape", "run files", "data_manifest.json without splits on --resume",
         ["train", "--resume", "{copy}"], r"data_manifest\.json' is malformed: it lacks the field 'splits'",
         setup=_json("data_manifest.json", {"tokenizer": {}})),
    Case("trainer-json-deep", "run files", "trainer.json nested 10^5 levels", ["train", "--resume", "{copy}"],
         r"trainer\.json'", setup=_write("{ckpt}/trainer.json", _deep(10**5))),
    # --- tokenizer files -----------------------------------------------------------------------------
    Case("tokenizer-not-json", "run files", "tokenizer.json that is not JSON", ["sample", "{copy}", "--prompt", "x"],
         r"tokenizer\.json' is not valid JSON", setup=_write("tokenizer.json", "vocab: [a, b]")),
    Case("tokenizer-list", "run files", "tokenizer.json that is a list", ["eval", "{copy}"],
         r"tokenizer\.json' is malformed: it must be a mapping", setup=_json("tokenizer.json", [])),
    Case("tokenizer-no-model", "run files", "tokenizer.json without its model", ["entropy", "{copy}"],
         r"tokenizer\.json' is malformed: it lacks the field 'model'", setup=_json("tokenizer.json", {"version": "1.0"})),
    Case("tokenizer-deep", "run files", "tokenizer.json nested 10^5 levels", ["sample", "{copy}", "--prompt", "x"],
         r"tokenizer\.json' is nested deeper than 32 levels", setup=_write("tokenizer.json", _deep(10**5))),
    Case("tokenizer-too-many-tokens", "run files", "tokenizer.json with more tokens than the model's vocabulary",
         ["sample", "{copy}", "--prompt", "x"], r"tokenizer\.json' has 1,112 tokens but the model's vocabulary is 512",
         setup=_extra_tokens),
    Case("tokenizer-bad-model", "run files", "tokenizer.json whose model the library rejects",
         ["sample", "{copy}", "--prompt", "x"], r"cannot load '.*tokenizer\.json'",
         setup=_json("tokenizer.json", {"model": {"type": "Nope"}})),
    Case("data-tokenizer-deep", "data", "data.tokenizer naming a tokenizer.json nested 10^5 levels",
         ["data", "data.tokenizer={tmp}/t.json", "data.cache_dir={tmp}/c"], r"t\.json' is nested deeper",
         setup=_write("tmp:t.json", _deep(10**5))),
    # --- safetensors headers ---------------------------------------------------------------------------
    Case("st-absurd-header", "run files", "model.safetensors whose header claims 2^60 bytes", ["eval", "{copy}"],
         r"model\.safetensors' is malformed: its header claims 1,152,921,504,606,846,976 bytes",
         setup=_st_bytes("model.safetensors", b"{}", claim=2**60)),
    Case("st-header-past-end", "run files", "model.safetensors whose header length runs past the file",
         ["sample", "{copy}", "--prompt", "x"], r"its header claims 1,000 bytes but the file has 2",
         setup=_st_bytes("model.safetensors", b"{}", claim=1000)),
    Case("st-short", "run files", "model.safetensors of 3 bytes", ["eval", "{copy}"],
         r"model\.safetensors' is malformed: 3 bytes, shorter than the 8-byte header length",
         setup=_write("model.safetensors", b"abc")),
    Case("st-header-not-json", "run files", "model.safetensors whose header is not JSON", ["eval", "{copy}"],
         r"model\.safetensors' header is not valid JSON", setup=_st_bytes("model.safetensors", b"{nope")),
    Case("st-header-list", "run files", "model.safetensors whose header is a list", ["entropy", "{copy}"],
         r"its header is a list, not a mapping", setup=_st_bytes("model.safetensors", b"[]")),
    Case("st-offsets-outside", "run files", "a tensor whose bytes lie past the end of the file",
         ["eval", "{copy}"], r"tensor 'w' has shape \[4\] and bytes \[0, 16\] outside the file's 8 data bytes",
         setup=_st_bytes("model.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                         data=b"\x00" * 8)),
    Case("st-bad-dtype", "run files", "a tensor of an unknown dtype", ["eval", "{copy}"],
         r"tensor 'w' has unknown dtype 'F128'",
         setup=_st_bytes("model.safetensors", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                         data=b"\x00" * 16)),
    Case("st-shape-bytes", "run files", "a tensor whose shape does not match its bytes", ["eval", "{copy}"],
         r"tensor 'w' of shape \[1000000\] \(F32\) does not match its 8 bytes",
         setup=_st_bytes("model.safetensors", {"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 8]}},
                         data=b"\x00" * 8)),
    Case("st-negative-shape", "run files", "a tensor with a negative dimension", ["eval", "{copy}"],
         r"tensor 'w' has shape \[-1\]",
         setup=_st_bytes("model.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})),
    Case("st-shape-string", "run files", "a tensor whose shape is a string", ["eval", "{copy}"],
         r"tensor 'w\.shape' must be a list", setup=_st_bytes("model.safetensors", {"w": {
             "dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, data=b"\x00" * 16)),
    Case("st-metadata-number", "run files", "safetensors __metadata__ with a number", ["eval", "{copy}"],
         r"__metadata__ must map names to strings",
         setup=_st_bytes("model.safetensors", {"__metadata__": {"step": 4}})),
    Case("st-optimizer-absurd", "resume", "a checkpoint's optimizer.safetensors claiming a 2^62-byte header",
         ["train", "--resume", "{copy}"], r"optimizer\.safetensors' is malformed: its header claims",
         setup=_st_bytes("{ckpt}/optimizer.safetensors", b"{}", claim=2**62)),
    Case("st-ckpt-weights-absurd", "resume", "a checkpoint's model.safetensors claiming a 2^60-byte header",
         ["train", "--resume", "{copy}"], r"model\.safetensors' is malformed: its header claims",
         setup=_st_bytes("{ckpt}/model.safetensors", b"{}", claim=2**60)),
    Case("st-reg-thresholds-absurd", "run files", "entropy_reg.safetensors whose header claims 2^60 bytes",
         ["entropy", "{copy}"], r"entropy_reg\.safetensors' is malformed: its header claims",
         setup=_st_bytes("entropy_reg.safetensors", b"{}", claim=2**60)),
    Case("st-reg-thresholds-missing", "run files", "entropy_reg.safetensors without its theta tensor",
         ["entropy", "{copy}"], r"entropy_reg\.safetensors' is malformed: it lacks the tensor 'theta'",
         setup=_st_bytes("entropy_reg.safetensors", {"other": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                         data=b"\x00" * 4)),
    Case("flight-record-ragged", "run files", "a flight record whose max_logit rows differ in length",
         ["report", "{copy}", "-o", "{tmp}/r.html"], r"'records\[0\]\.max_logit' must be a rectangular list",
         setup=_json("flight_recorder.json", {"format": "privlm-flight-recorder/1", "divergence_step": 3, "records": [
             {"step": 1, "head_entropy": [[1.0]], "max_logit": [[1.0, 2.0], [1.0]], "resid_norm": [1.0]}]})),
    Case("cost-profile-list", "cost", "a cost profile file that is a list", ["cost", "SM+LN+G", "--profile",
         "{tmp}/p.json"], r"p\.json' is malformed: it must be a mapping", setup=_write("tmp:p.json", "[]")),
    Case("cost-profile-deep", "cost", "a cost profile nested 10^5 levels", ["cost", "SM+LN+G", "--profile",
         "{tmp}/p.json"], r"p\.json' is nested deeper than 32 levels", setup=_write("tmp:p.json", _deep(10**5))),
    # --- non-finite weights -----------------------------------------------------------------------------
    Case("weights-nan-sample", "weights", "a NaN in model.safetensors (sample used to crash in multinomial)",
         ["sample", "{copy}", "--prompt", "x"], r"model\.safetensors' has non-finite weights: 1 NaN/inf value in",
         setup=_poison(float("nan"))),
    Case("weights-inf-eval", "weights", "+inf in model.safetensors", ["eval", "{copy}"],
         r"model\.safetensors' has non-finite weights: 1 NaN/inf value", setup=_poison(float("inf"))),
    Case("weights-ninf-entropy", "weights", "-inf in model.safetensors", ["entropy", "{copy}"],
         r"has non-finite weights", setup=_poison(float("-inf"))),
    Case("weights-nan-export-hf", "weights", "a NaN in the weights given to export-hf",
         ["export-hf", "{copy}", "{tmp}/hfout"], r"has non-finite weights", setup=_poison(float("nan"))),
    Case("weights-nan-pi", "weights", "a NaN in the weights given to pi run (before any 2PC)",
         ["pi", "run", "{copy}", "--tokens", "1,2"], r"has non-finite weights", setup=_poison(float("nan"))),
    Case("weights-nan-resume", "weights", "a NaN in the checkpoint resumed from",
         ["train", "--resume", "{copy}", "train.max_steps=6"], r"model\.safetensors' has non-finite weights",
         setup=_poison(float("nan"), "{ckpt}/model.safetensors")),
    Case("pi-calibrate-rounds-only-semi2k", "pi", "--rounds-only under SEMI2K (its rounds are its messages)",
         ["pi", "calibrate", "--protocol", "semi2k", "--rounds-only", "--out", "{tmp}/p.json"],
         r"--rounds-only: SEMI2K's rounds are its messages"),
    Case("pi-calibrate-rounds-only-no-profile", "pi", "--rounds-only into a profile that does not exist",
         ["pi", "calibrate", "--rounds-only", "--out", "{tmp}/none.json"],
         r"--rounds-only merges into an existing profile; '.*none\.json' does not exist"),
    Case("pi-calibrate-rounds-only-op-missing", "pi", "--rounds-only --ops naming an op the profile has no entry for",
         ["pi", "calibrate", "--spu-profile", "puma", "--rounds-only", "--ops", "rotary", "--out", "{tmp}/p.json"],
         r"--rounds-only: none of rotary is an op of '.*p\.json'", setup=_shipped_profile("spu-puma-measured",
                                                                                         drop="rotary")),
    Case("pi-calibrate-rounds-only-not-measured", "pi", "--rounds-only into a profile no calibration measured",
         ["pi", "calibrate", "--rounds-only", "--out", "{tmp}/p.json"],
         r"--rounds-only: '.*p\.json' was not measured by `privlm pi calibrate`",
         setup=_shipped_profile("paper-fit")),
    Case("pi-calibrate-rounds-only-other-settings", "pi", "--rounds-only into a profile measured under other "
         "SPU settings", ["pi", "calibrate", "--rounds-only", "--out", "{tmp}/p.json"],
         r"profile 'spu-puma-measured' was measured under other SPU settings than 'default' has now",
         setup=_shipped_profile("spu-puma-measured")),
    Case("pi-calibrate-rounds-only-bad-json", "pi", "--rounds-only into a file that is not JSON",
         ["pi", "calibrate", "--rounds-only", "--out", "{tmp}/p.json"], r"'.*p\.json' is not valid JSON",
         setup=_write("tmp:p.json", '{"nonlinear": [')),
    # --- token ids and prompts ----------------------------------------------------------------------------
    Case("pi-tokens-out-of-vocab", "pi", "--tokens with an id past the vocabulary",
         ["pi", "run", "{run}", "--tokens", "1,99999"], r"token ids \[99999\] are outside the vocabulary 0\.\.511"),
    Case("pi-tokens-negative", "pi", "--tokens with a negative id", ["pi", "run", "{run}", "--tokens", "3,-1"],
         r"token ids \[-1\] are outside the vocabulary"),
    Case("pi-tokens-huge", "pi", "--tokens with a 40-digit id", ["pi", "run", "{run}", "--tokens", "1" * 40],
         r"token ids \[1111111111111111111111111111111111111111\] are outside"),
    Case("pi-tokens-empty", "pi", "--tokens of commas only", ["pi", "run", "{run}", "--tokens", ",,"],
         r"empty after tokenization"),
    Case("pi-tokens-too-long", "pi", "--tokens longer than the position table",
         ["pi", "run", "{run}", "--tokens", ",".join(["1"] * 65)], r"the prompt has 65 tokens but the model's "
         r"position table holds 64"),
    Case("pi-prompt-non-utf8", "pi", "a pi run prompt that is not UTF-8 (byte 0xff)",
         ["pi", "run", "{run}", "--prompt", "import\udcff os"], r"--prompt is not valid UTF-8"),
    Case("sample-prompt-non-utf8-start", "sample", "a prompt starting with an undecodable byte",
         ["sample", "{run}", "--prompt", "\udc80abc"], r"--prompt is not valid UTF-8 text \(undecodable byte at "
         r"character 0\)"),
    Case("eval-token-cache-ids", "eval", "a token cache whose ids lie outside the vocabulary",
         ["eval", "{copy}"], r"token cache '.*valid\.bin' has token id 65535, outside the model's vocabulary 0\.\.511",
         setup=_bad_token_cache),
    Case("data-jsonl-deep", "data", "a jsonl data file whose row is nested 10^5 levels",
         ["data", "data.source=files:{tmp}/d/*.jsonl", "data.cache_dir={tmp}/c"],
         r"deep\.jsonl' line 1 is nested deeper than 32 levels", setup=_write("tmp:d/deep.jsonl", _deep(10**5) + "\n")),
    Case("eval-data-jsonl-deep", "eval", "eval --data with a jsonl row nested 10^5 levels",
         ["eval", "{run}", "--data", "files:{tmp}/d/*.jsonl"], r"deep\.jsonl' line 2 is nested deeper",
         setup=_write("tmp:d/deep.jsonl", '{"content": "x = 1"}\n' + _deep(10**5) + "\n")),
    Case("pi-program-json-list", "pi", "a client bundle whose program.json is a list",
         ["pi", "run", "{tmp}/bundle", "--mode", "2proc", "--party", "0", "--tokens", "1"],
         r"program\.json' is malformed: it must be a mapping", setup=_write("tmp:bundle/program.json", "[]")),
    Case("pi-program-json-vocab", "pi", "a client bundle whose program.json has vocab_size a string",
         ["pi", "run", "{tmp}/bundle", "--mode", "2proc", "--party", "0", "--tokens", "1"],
         r"program\.json' is malformed: 'vocab_size' must be an integer",
         setup=_json("tmp:bundle/program.json", {"format": "privlm-trace/1", "T": 1, "vocab_size": "many"})),
    Case("pi-bundle-wrong-T", "pi", "a client prompt longer than the T the bundle's program was exported for",
         ["pi", "run", "{tmp}/bundle", "--mode", "2proc", "--party", "0", "--tokens", "1,2,3"],
         r"the prompt has 3 tokens but the client bundle's program was exported for T=8",
         setup=_json("tmp:bundle/program.json", {"format": "privlm-trace/1", "T": 8, "vocab_size": 512})),
    Case("pi-export-no-T", "pi", "pi export without the prompt length the program is traced for",
         ["pi", "export", "{run}", "{tmp}/out"], r"the 2PC program is traced for one prompt length: give --T"),
    Case("pi-eval-data-run", "pi", "pi eval --data for a privlm run (evaluated on its own validation split)",
         ["pi", "eval", "{run}", "--data", "stdlib"], r"--data applies to Hugging Face models"),
    Case("pi-bundle-tokenizer-deep", "pi", "a client bundle whose tokenizer.json is nested 10^5 levels",
         ["pi", "run", "{tmp}/bundle", "--mode", "2proc", "--party", "0", "--prompt", "x"],
         r"tokenizer\.json' is nested deeper than 32 levels",
         setup=lambda copy, tmp: (_json("tmp:bundle/program.json", {"format": "privlm-trace/1", "T": 1,
                                                                     "vocab_size": 512})(copy, tmp),
                                  _write("tmp:bundle/tokenizer.json", _deep(10**5))(copy, tmp))),
    # --- sizes that cannot fit (memory estimated before allocation) ---------------------------------------
    Case("train-layers-1e9", "sizes", "model.n_layer=10^9", ["train", "model.n_layer=1000000000", "--out", "{tmp}/o"],
         r"model\.n_layer=1000000000 is too large \(at most 4,096"),
    Case("inspect-layers-1e9", "sizes", "inspect with model.n_layer=10^9", ["inspect", "model.n_layer=1000000000"],
         r"model\.n_layer=1000000000 is too large"),
    Case("cost-layers-1e9", "sizes", "cost with model.n_layer=10^9", ["cost", "SM+LN+G", "model.n_layer=1000000000"],
         r"model\.n_layer=1000000000 is too large"),
    Case("train-embd-1e5", "sizes", "model.n_embd=10^5 (over 20 TiB with gradients and AdamW state; 16 GiB budget, or what is available)",
         ["train", "model.n_embd=100000", "model.n_head=10", "--out", "{tmp}/o"],
         r"model SM\+LN\+G \(L12 d100000 V50257, [\d,]+ parameters\) with batch 16x128 needs at least [\d.]+ TiB "
         r"of memory but only (16\.0|1[0-5]\.\d) GiB", env={M: str(16 * 2**30)}),
    Case("inspect-embd-1e5", "sizes", "inspect of a scaled preset with n_embd 10^5 (builds real weights)",
         ["inspect", "SM+ScFFN", "model.n_embd=100000", "model.n_head=10"], r"needs at least [\d.]+ TiB of memory",
         env={M: str(16 * 2**30)}),
    Case("train-embd-too-large", "sizes", "model.n_embd=10^6", ["train", "model.n_embd=1000000", "--out",
         "{tmp}/o"], r"model\.n_embd=1000000 is too large"),
    Case("train-batch-cannot-fit", "sizes", "a batch of 60,000 sequences of 1,024 tokens",
         ["train", "train.batch_size=60000", "data.seq_len=1024", "--out", "{tmp}/o"],
         r"with batch 60000x1024 needs at least [\d.]+ TiB of memory", env={M: str(16 * 2**30)}),
    Case("train-memory-limit", "sizes", "a model larger than PRIVLM_MEMORY_LIMIT",
         ["train", "--out", "{tmp}/o"], r"needs at least [\d.]+ GiB of memory but only 95\.4 MiB is available",
         env={M: "100000000"}),
    Case("train-memory-limit-word", "sizes", "PRIVLM_MEMORY_LIMIT that is not a number",
         ["train", "--out", "{tmp}/o"], r"PRIVLM_MEMORY_LIMIT='lots' must be a positive number of bytes", env={M: "lots"}),
    Case("train-memory-limit-negative", "sizes", "PRIVLM_MEMORY_LIMIT=-1", ["eval", "{run}"],
         r"PRIVLM_MEMORY_LIMIT='-1' must be a positive number of bytes", env={M: "-1"}),
    Case("eval-batch-cannot-fit", "sizes", "eval --batch-size 65536 under a 1 GB memory budget",
         ["eval", "{run}", "--batch-size", "65536"], r"with batch 65536x64 needs at least [\d.]+ GiB",
         env={M: "1000000000"}),
    Case("entropy-batch-cannot-fit", "sizes", "entropy --batch-size 65536 under a 1 GB memory budget",
         ["entropy", "{run}", "--batch-size", "65536"], r"with batch 65536x64 needs at least", env={M: "1000000000"}),
    Case("pi-vocab-1e6", "sizes", "a 10^6-token vocabulary under 2PC (weights as shares of both parties)",
         ["pi", "run", "{copy}", "--tokens", "1,2"], r"a 2PC run of '.*' \(L2 d64 V1000000, 1x1 tokens\) needs at "
         r"least [\d.]+ GiB of memory but only 953\.7 MiB", setup=_config(model__vocab_size=10**6), env={M: "1000000000"}),
    Case("pi-eval-vocab-1e6", "sizes", "pi eval of a 10^6-token vocabulary", ["pi", "eval", "{copy}"],
         r"a 2PC run of .* V1000000, 2x2 tokens\) needs at least", setup=_config(model__vocab_size=10**6),
         env={M: "1000000000"}),
    Case("seq-len-1e12", "sizes", "data.seq_len=10^12", ["train", "data.seq_len=1000000000000", "--out", "{tmp}/o"],
         r"data\.seq_len=1000000000000 is too large"),
    Case("sweep-grid-huge", "sweep", "a sweep grid of 10^8 runs", ["sweep", "{tmp}/s.yaml", "--list"],
         r"100,000,000 runs \('runs' x 'grid'\), more than the 10,000",
         setup=_write("tmp:s.yaml", "name: s\nruns: [SM+LN+G]\ngrid:\n" + "".join(
             f"  train.{k}: [{', '.join(str(i + 1) for i in range(100))}]\n"
             for k in ("log_every", "save_every", "eval_every", "entropy_every")))),
    # --- config fields: bounds -----------------------------------------------------------------------------
    Case("cfg-seed-2e70", "config bounds", "train.seed=2^70", ["train", f"train.seed={2**70}", "--out", "{tmp}/o"],
         r"train\.seed=1180591620717411303424 is too large \(at most 9,223,372,036,854,775,807"),
    Case("cfg-seed-negative", "config bounds", "train.seed=-1", ["train", "train.seed=-1", "--out", "{tmp}/o"],
         r"train\.seed=-1 and data\.shuffle_seed=0 must be >= 0"),
    Case("cfg-batch-1e9", "config bounds", "train.batch_size=10^9", ["train", "train.batch_size=1000000000",
         "--out", "{tmp}/o"], r"train\.batch_size=1000000000 is too large \(at most 65,536"),
    Case("cfg-vocab-1e9", "config bounds", "model.vocab_size=10^9", ["cost", "SM+LN+G", "model.vocab_size=1000000000"],
         r"model\.vocab_size=1000000000 is too large"),
    Case("cfg-heads-1e6", "config bounds", "model.n_head=10^6 (more heads than width)",
         ["inspect", "model.n_head=1000000"], r"model\.n_head=1000000 is too large|not divisible"),
    Case("cfg-block-1e9", "config bounds", "model.block_size=10^9", ["inspect", "model.block_size=1000000000"],
         r"model\.block_size=1000000000 is too large"),
    Case("cfg-ffn-1e9", "config bounds", "model.ffn_hidden=10^9", ["cost", "SM+LN+G", "model.ffn_hidden=1000000000"],
         r"model\.ffn_hidden=1000000000 is too large"),
    Case("cfg-flight-1e9", "config bounds", "train.flight_steps=10^9", ["train", "train.flight_steps=1000000000",
         "--out", "{tmp}/o"], r"train\.flight_steps=1000000000 is too large"),
    Case("cfg-steps-1e15", "config bounds", "train.max_steps=10^15", ["train", "train.max_steps=1000000000000000",
         "--out", "{tmp}/o"], r"train\.max_steps=1000000000000000 is too large"),
    Case("cfg-ln-eps-zero", "config bounds", "model.layer_norm_eps=0", ["train", "model.layer_norm_eps=0", "--out",
         "{tmp}/o"], r"model\.layer_norm_eps=0\.0 > 0"),
    Case("cfg-dropout-one", "config bounds", "model.embd_dropout=1", ["train", "model.embd_dropout=1", "--out",
         "{tmp}/o"], r"model\.embd_dropout=1\.0 in \[0, 1\)"),
    Case("cfg-init-std-negative", "config bounds", "model.init_std=-0.02", ["train", "model.init_std=-0.02",
         "--out", "{tmp}/o"], r"model\.init_std=-0\.02 must be >= 0"),
    Case("cfg-temperature-min-zero", "config bounds", "model.temperature_min=0",
         ["inspect", "SM(t)+ScFuFFN", "model.temperature_min=0"], r"model\.temperature_min=0\.0 must be > 0"),
    Case("cfg-lr-huge", "config bounds", "train.lr=1e300", ["train", "train.lr=1e300", "--out", "{tmp}/o"],
         r"train\.lr=1e\+300 is too large"),
    Case("cfg-shuffle-seed-huge", "config bounds", "data.shuffle_seed=2^64", ["data", f"data.shuffle_seed={2**64}"],
         r"data\.shuffle_seed=18446744073709551616 is too large"),
    Case("cfg-max-docs-huge", "config bounds", "data.max_train_docs=10^30",
         ["data", "data.max_train_docs=1000000000000000000000000000000"], r"data\.max_train_docs|too large|int"),
    # --- sweep files -----------------------------------------------------------------------------------------
    Case("sweep-alias-bomb", "sweep", "a sweep file with a billion-laughs alias bomb",
         ["sweep", "{tmp}/s.yaml", "--list"], r"sweep file '.*s\.yaml' expands to more than 200,000 values",
         setup=_write("tmp:s.yaml", SWEEP_LAUGHS)),
    Case("sweep-string", "sweep", "a sweep file that is a string", ["sweep", "{tmp}/s.yaml", "--list"],
         r"must be a mapping with at least 'runs' or 'grid'", setup=_write("tmp:s.yaml", "hello\n")),
    Case("sweep-deep", "sweep", "a sweep file nested 10^4 levels", ["sweep", "{tmp}/s.yaml", "--list"],
         r"sweep file '.*' is nested deeper than 32 levels", setup=_write("tmp:s.yaml", "runs: " + _deep(10**4))),
    Case("sweep-not-utf8", "sweep", "a sweep file in Latin-1", ["sweep", "{tmp}/s.yaml", "--list"],
         r"s\.yaml' is not UTF-8 text", setup=_write("tmp:s.yaml", b"name: caf\xe9\nruns: [SM+LN+G]\n")),
    Case("sweep-python-tag", "sweep", "a sweep file with a !!python/object tag", ["sweep", "{tmp}/s.yaml", "--list"],
         r"not valid YAML: could not determine a constructor",
         setup=_write("tmp:s.yaml", "name: !!python/object/apply:os.system ['true']\nruns: [SM+LN+G]\n")),
    Case("sweep-recursive", "sweep", "a sweep file whose runs contain themselves", ["sweep", "{tmp}/s.yaml", "--list"],
         r"refers to itself through an alias", setup=_write("tmp:s.yaml", "name: s\nruns: &r [*r]\n")),
    Case("sweep-state-list", "sweep", "a sweep directory whose sweep.json is a list",
         ["sweep", "{tmp}/s.yaml", "--out", "{tmp}/sw"], r"sweep\.json' is malformed: it must be a mapping",
         setup=lambda copy, tmp: (_write("tmp:s.yaml", "name: s\nruns: [SM+LN+G]\n")(copy, tmp),
                                  _write("tmp:sw/sweep.json", "[]")(copy, tmp))),
    Case("sweep-state-runs", "sweep", "sweep.json whose runs entry is a number",
         ["sweep", "{tmp}/s.yaml", "--out", "{tmp}/sw"], r"sweep\.json' is malformed: 'runs\.x' must be a mapping",
         setup=lambda copy, tmp: (_write("tmp:s.yaml", "name: s\nruns: [SM+LN+G]\n")(copy, tmp),
                                  _write("tmp:sw/sweep.json", '{"runs": {"x": 3}}')(copy, tmp))),
    Case("config-file-alias-bomb", "train", "a config file with a billion-laughs alias bomb",
         ["train", "{tmp}/c.yaml", "--out", "{tmp}/o"], r"config file '.*c\.yaml' expands to more than 200,000",
         setup=_write("tmp:c.yaml", BILLION_LAUGHS)),
    Case("config-file-deep", "train", "a config file nested 10^4 levels", ["inspect", "{tmp}/c.yaml"],
         r"config file '.*c\.yaml' is nested deeper than 32 levels", setup=_write("tmp:c.yaml", "model: " + _deep(10**4))),
    Case("config-file-huge", "train", "a 100 kB config file", ["inspect", "{tmp}/c.yaml"],
         r"c\.yaml' is 100,001 bytes, more than the 65,536", setup=_write("tmp:c.yaml", "#" + "x" * 100_000)),
    # --- Hugging Face model directories ----------------------------------------------------------------------
    Case("hf-n-head-zero", "hf", "an HF config.json with n_head 0", ["cost", "{tmp}/hf"],
         r"config\.json' field 'n_head' = 0 must be a positive integer", setup=_hf({"n_head": 0})),
    Case("hf-n-layer-1e9", "hf", "an HF config.json with 10^9 layers", ["inspect", "{tmp}/hf"],
         r"field 'n_layer' = 1,000,000,000 is too large \(at most 4,096\)", setup=_hf({"n_layer": 10**9})),
    Case("hf-n-embd-negative", "hf", "an HF config.json with n_embd -16", ["cost", "{tmp}/hf"],
         r"field 'n_embd' = -16 must be a positive integer", setup=_hf({"n_embd": -16})),
    Case("hf-vocab-string", "hf", "an HF config.json with vocab_size a string", ["cost", "{tmp}/hf"],
         r"vocab_size", setup=_hf({"vocab_size": "big"})),  # transformers' own one-line validation
    Case("hf-vocab-float", "hf", "an HF config.json with vocab_size 64.5", ["cost", "{tmp}/hf"],
         r"vocab_size", setup=_hf({"vocab_size": 64.5})),
    Case("hf-heads-divide", "hf", "an HF config.json whose heads do not divide the width", ["cost", "{tmp}/hf"],
         r"field 'n_embd' = 16 is not divisible by 'n_head' = 3", setup=_hf({"n_head": 3})),
    Case("hf-positions-huge", "hf", "an HF config.json with 10^12 positions", ["cost", "{tmp}/hf"],
         r"field 'n_positions' = 1,000,000,000,000 is too large", setup=_hf({"n_positions": 10**12})),
    Case("hf-config-list", "hf", "an HF config.json that is a list", ["cost", "{tmp}/hf"],
         r"config\.json' is malformed: it must be a mapping \(got a list\)", setup=_hf("[]")),
    Case("hf-model-type-number", "hf", "an HF config.json whose model_type is a number", ["inspect", "{tmp}/hf"],
         r"not a transformers config", setup=_hf({"model_type": 7})),
    Case("hf-config-deep", "hf", "an HF config.json nested 10^5 levels", ["cost", "{tmp}/hf"],
         r"config\.json' is nested deeper than 32 levels", setup=_hf(_deep(10**5))),
    Case("hf-config-not-utf8", "hf", "an HF config.json in Latin-1", ["cost", "{tmp}/hf"],
         r"config\.json' is not UTF-8 text",
         setup=lambda copy, tmp: (_hf()(copy, tmp), (tmp / "hf" / "config.json").write_bytes(b'{"a": "\xe9"}'))),
    Case("hf-absurd-safetensors", "hf", "HF weights whose safetensors header claims 2^60 bytes", ["entropy", "{tmp}/hf"],
         r"model\.safetensors' is malformed: its header claims", setup=_hf(weights="absurd")),
    Case("hf-nan-weights", "hf", "HF weights holding a NaN", ["entropy", "{tmp}/hf"],
         r"'.*hf' has non-finite weights: 1 NaN/inf value in 'transformer\.h\.0\.mlp\.c_fc\.weight'",
         setup=_hf(weights="nan")),
    Case("hf-tokenizer-config-deep", "hf", "an HF model whose tokenizer_config.json is nested 10^5 levels",
         ["entropy", "{tmp}/hf"], r"tokenizer_config\.json' is nested deeper than 32 levels",
         setup=lambda copy, tmp: (_hf(weights="ok")(copy, tmp),
                                  (tmp / "hf" / "tokenizer_config.json").write_text(_deep(10**5)))),
    Case("hf-tokenizer-list", "hf", "an HF model whose tokenizer.json is a list", ["entropy", "{tmp}/hf"],
         r"hf/tokenizer\.json' is malformed: it must be a mapping",
         setup=lambda copy, tmp: (_hf(weights="ok")(copy, tmp), (tmp / "hf" / "tokenizer.json").write_text("[]"))),
    Case("hf-too-large", "hf", "an HF model larger than the memory budget", ["entropy", "{tmp}/hf"],
         r"model '.*hf' \([\d,]+\+ parameters\) needs at least [\d.]+ GiB of memory",
         setup=_hf({"n_embd": 4096, "n_head": 32, "n_layer": 48, "vocab_size": 200000}, weights="absurd"),
         env={M: "1000000000"}),
]

FLAG_BOUNDS = [
    # --- numeric flags: every one bounded (bounded_int / bounded_float in privlm.errors) ----------------------
    Case(f"flag-{cmd.replace(' ', '-')}{flag}-{name}", cmd.split()[0], f"{flag} {value}",
         [*cmd.split(), *pre, flag, value], expect)
    for cmd, pre, flag, value, name, expect in [
        ("sample", ["{run}", "--prompt", "x"], "--max-new-tokens", "-1", "negative", r"-1 must be >= 0"),
        ("sample", ["{run}", "--prompt", "x"], "--max-new-tokens", "1000000000", "1e9",
         r"argument --max-new-tokens: 1000000000 is too large \(at most 65,536\)"),
        ("sample", ["{run}", "--prompt", "x"], "--top-k", "-5", "negative", r"-5 must be a positive integer"),
        ("sample", ["{run}", "--prompt", "x"], "--top-k", "1000000000", "1e9", r"--top-k: 1000000000 is too large"),
        ("sample", ["{run}", "--prompt", "x"], "--seed", str(2**70), "2e70", r"--seed: \d+ is too large"),
        ("sample", ["{run}", "--prompt", "x"], "--seed", "-1", "negative", r"--seed: -1 must be >= 0"),
        ("sample", ["{run}", "--prompt", "x"], "--seed", "1.5", "float", r"--seed: '1\.5' is not an integer"),
        ("sample", ["{run}", "--prompt", "x"], "--temperature", "inf", "inf", r"--temperature: inf is not a finite"),
        ("sample", ["{run}", "--prompt", "x"], "--temperature", "1e-300", "tiny",
         r"--temperature: 1e-300 must be 0 or in \[0\.0001, 10000\]"),
        ("sample", ["{run}", "--prompt", "x"], "--temperature", "1e9", "huge", r"must be 0 or in \[0\.0001, 10000\]"),
        ("sample", ["{run}", "--prompt", "x"], "--temperature", "hot", "word", r"--temperature: 'hot' is not a number"),
        ("eval", ["{run}"], "--batch-size", "-4", "negative", r"--batch-size: -4 must be a positive integer"),
        ("eval", ["{run}"], "--batch-size", "1000000000", "1e9", r"--batch-size: 1000000000 is too large"),
        ("eval", ["{run}"], "--max-batches", "-1", "negative", r"--max-batches: -1 must be a positive integer"),
        ("eval", ["{run}"], "--max-batches", "0", "zero", r"--max-batches: 0 must be a positive integer"),
        ("eval", ["{run}"], "--max-batches", str(2**40), "2e40", r"--max-batches: \d+ is too large"),
        ("entropy", ["{run}"], "--batch-size", "0", "zero", r"--batch-size: 0 must be a positive integer"),
        ("entropy", ["{run}"], "--batch-size", "-4", "negative", r"--batch-size: -4 must be a positive integer"),
        ("entropy", ["{run}"], "--max-batches", "-1", "negative", r"--max-batches: -1 must be a positive integer"),
        ("entropy", ["{run}"], "--T", "1000000000000", "1e12", r"--T: 1000000000000 is too large"),
        ("entropy", ["{run}"], "--T", "0", "zero", r"--T: 0 must be a positive integer"),
        ("entropy", ["{run}"], "--max-value", "nan", "nan", r"--max-value: nan is not a finite number"),
        ("entropy", ["{run}"], "--max-value", "-1", "negative", r"--max-value: -1 must be in"),
        ("cost", ["SM+LN+G"], "--T", "1000000000000", "1e12", r"--T: 1000000000000 is too large \(at most 1,048,576\)"),
        ("cost", ["SM+LN+G"], "--T", "-5", "negative", r"--T: -5 must be a positive integer"),
        ("cost", ["SM+LN+G"], "--T", "many", "word", r"--T: 'many' is not an integer"),
        ("sweep", ["{tmp}/s.yaml"], "--jobs", "0", "zero", r"--jobs: 0 must be a positive integer"),
        ("sweep", ["{tmp}/s.yaml"], "--jobs", "1000000", "1e6", r"--jobs: 1000000 is too large \(at most 256\)"),
        ("sweep", ["{tmp}/s.yaml"], "--threads", "-2", "negative", r"--threads: -2 must be a positive integer"),
        ("sweep", ["{tmp}/s.yaml"], "--max-runs", "-1", "negative", r"--max-runs: -1 must be >= 0"),
        ("demo", [], "--jobs", "0", "zero", r"--jobs: 0 must be a positive integer"),
        ("pi run", ["{run}", "--tokens", "1"], "--chunks", "1000000000", "1e9", r"--chunks: 1000000000 is too large"),
        ("pi run", ["{run}", "--tokens", "1"], "--chunks", "0", "zero", r"--chunks: 0 must be a positive integer"),
        ("pi run", ["{run}", "--tokens", "1"], "--matmul-block", "-1", "negative",
         r"--matmul-block: -1 must be a positive integer"),
        ("pi run", ["{run}", "--mode", "2proc", "--party", "1"], "--T", "1000000000000", "1e12",
         r"--T: 1000000000000 is too large"),
        ("pi eval", ["{run}"], "--sequences", "1000000000", "1e9", r"--sequences: 1000000000 is too large"),
        ("pi eval", ["{run}"], "--sequences", "0", "zero", r"--sequences: 0 must be a positive integer"),
        ("pi eval", ["{run}"], "--T", "1000000000000", "1e12", r"--T: 1000000000000 is too large"),
        ("pi measure", ["SM+LN+G"], "--T", "0", "zero", r"--T: 0 must be a positive integer"),
        ("pi measure", ["SM+LN+G"], "--layers-measured", "0", "zero", r"--layers-measured: 0 must be a positive"),
        ("pi measure", ["SM+LN+G"], "--vocab-measured", "1000000000", "1e9", r"--vocab-measured: \d+ is too large"),
        ("pi measure", ["SM+LN+G"], "--chunks", "1000000000", "1e9", r"--chunks: 1000000000 is too large"),
        ("pi measure", ["SM+LN+G"], "--matmul-block", "-1", "negative", r"--matmul-block: -1 must be >= 0"),
        ("pi calibrate", [], "--rounds-delay-ms", "nan", "nan", r"--rounds-delay-ms: nan is not a finite number"),
        ("pi calibrate", [], "--rounds-delay-ms", "-1", "negative", r"--rounds-delay-ms: -1 must be in \[0, 60000\]"),
    ]
]

VALIDATION_CASES = RUN_FILES + FLAG_BOUNDS


CASES = [
    # --- train -------------------------------------------------------------------------------------
    Case("train-unknown-preset", "train", "a preset name that does not exist",
         ["train", "SM+XYZ", "--out", "{tmp}/o"], r"SM\+XYZ|XYZ"),
    Case("train-unknown-key", "train", "a misspelled config key",
         ["train", "model.n_layers=2", "--out", "{tmp}/o"], r"unknown config key 'model.n_layers'"),
    Case("train-lr-inf", "train", "train.lr=inf", ["train", "train.lr=inf", "--out", "{tmp}/o"],
         r"train\.lr=inf must be a finite number"),
    Case("train-lr-nan", "train", "train.lr=nan (must not blame train.min_lr)",
         ["train", "train.lr=nan", "--out", "{tmp}/o"], r"train\.lr=nan must be a finite number"),
    Case("train-eps-ninf", "train", "train.eps=-inf", ["train", "train.eps=-inf", "--out", "{tmp}/o"],
         r"train\.eps=-inf must be a finite number"),
    Case("train-reg-gamma-nan", "train", "reg.gamma=nan", ["train", "reg.gamma=nan", "--out", "{tmp}/o"],
         r"reg\.gamma=nan must be a finite number"),
    Case("train-wrong-type", "train", "a word where an integer belongs",
         ["train", "model.n_layer=abc", "--out", "{tmp}/o"], r"model\.n_layer"),
    Case("train-heads-divide", "train", "n_embd not divisible by n_head",
         ["train", "model.n_embd=100", "model.n_head=3", "--out", "{tmp}/o"], r"not divisible by model\.n_head=3"),
    Case("train-negative-steps", "train", "train.max_steps=0", ["train", "train.max_steps=0", "--out", "{tmp}/o"],
         r"train\.max_steps=0 must be a positive integer"),
    Case("train-bad-choice", "train", "a value outside a field's choices",
         ["train", "train.schedule=cosinus", "--out", "{tmp}/o"], r"train\.schedule='cosinus' is not allowed"),
    Case("train-out-is-file", "train", "--out names an existing file",
         ["train", "--out", "{ctx:file}"], r"exists and is not a directory"),
    Case("train-out-nonempty", "train", "--out is a non-empty directory that is not a run",
         ["train", "--out", "{ctx:corpus}"], r"already exists and is not empty .*choose another --out"),
    Case("train-out-is-run", "train", "--out is an existing run", ["train", "--out", "{run}"],
         r"holds a run; choose another --out or continue it with --resume"),
    Case("train-out-unwritable", "train", "--out below a regular file (cannot be created)",
         ["train", "--out", "{ctx:file}/run"], r"Not a directory: '.*file"),
    Case("train-cache-unwritable", "train", "PRIVLM_CACHE cannot be created",
         ["train", "{ctx:data_files}", "--out", "{tmp}/o"], r"Not a directory|cache",
         env={"PRIVLM_CACHE": "{ctx:file}/cache"}),
    Case("train-bad-yaml", "train", "a config file that is not YAML", ["train", "{ctx:bad_yaml}"],
         r"is not valid YAML"),
    Case("train-missing-yaml", "train", "a config file that does not exist", ["train", "{tmp}/nope.yaml"],
         r"nope\.yaml' does not exist"),
    Case("train-unknown-option", "train", "an option train does not have", ["train", "--bogus"],
         r"unrecognized arguments: --bogus"),
    Case("train-out-and-resume", "train", "--out and --resume together",
         ["train", "--resume", "{run}", "--out", "{tmp}/o"], r"either --out .* or --resume"),
    Case("train-no-data", "train", "data.source glob matching nothing",
         ["train", "data.source=files:{tmp}/none/*.py", "--out", "{tmp}/o"], r"matches no files"),
    # --- resume ------------------------------------------------------------------------------------
    Case("resume-missing", "resume", "--resume of a directory that does not exist",
         ["train", "--resume", "{tmp}/nope"], r"does not exist"),
    Case("resume-not-a-run", "resume", "--resume of a directory without config.yaml",
         ["train", "--resume", "{ctx:corpus}"], r"not a privlm run directory"),
    Case("resume-model-override", "resume", "a model.* override on --resume",
         ["train", "--resume", "{copy}", "model.n_layer=3"], r"model\.n_layer cannot change when resuming"),
    Case("resume-batch-override", "resume", "train.batch_size changed on --resume",
         ["train", "--resume", "{copy}", "train.batch_size=3"], r"train\.batch_size cannot change when resuming"),
    Case("resume-steps-below", "resume", "train.max_steps below the reached step",
         ["train", "--resume", "{copy}", "train.max_steps=1"], r"train\.max_steps=1 is below step 4"),
    Case("resume-lr-nan", "resume", "train.lr=nan on --resume", ["train", "--resume", "{copy}", "train.lr=nan"],
         r"train\.lr=nan must be a finite number"),
    Case("resume-malformed-rng", "resume", "a malformed rng.safetensors",
         ["train", "--resume", "{copy}"], r"rng\.safetensors' is malformed",
         setup=_write("{ckpt}/rng.safetensors", b"\x00garbage")),
    Case("resume-truncated-optimizer", "resume", "a truncated optimizer.safetensors",
         ["train", "--resume", "{copy}"], r"optimizer\.safetensors' is malformed",
         setup=_write("{ckpt}/optimizer.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")),
    Case("resume-foreign-state", "resume", "a safetensors state file of another program",
         ["train", "--resume", "{copy}"], r"rng\.safetensors' is malformed: not a privlm-state/1 file",
         setup=lambda copy, tmp: __import__("safetensors.torch").torch.save_file(
             {"x": __import__("torch").zeros(1)}, str(_ckpt(copy) / "rng.safetensors"))),
    Case("resume-old-pickle", "resume", "a checkpoint in the old pickled format (optimizer.pt, rng.pt)",
         ["train", "--resume", "{copy}"], r"old pickled state format .* cannot be resumed",
         setup=_old_pickled_state),
    Case("resume-dangling-latest", "resume", "state/LATEST naming a missing checkpoint",
         ["train", "--resume", "{copy}"], r"missing or incomplete", setup=_dangling_latest),
    Case("resume-corrupt-trainer-json", "resume", "a trainer.json that is not JSON",
         ["train", "--resume", "{copy}"], r"trainer\.json'", setup=_write("{ckpt}/trainer.json", "{oops")),
    Case("resume-trainer-json-shape", "resume", "a trainer.json that is JSON but not a trainer state",
         ["train", "--resume", "{copy}"], r"trainer\.json' is malformed: it needs integer step",
         setup=_write("{ckpt}/trainer.json", '{"step": "4", "position": []}')),
    Case("resume-locked", "resume", "--resume while another process writes the run",
         ["train", "--resume", "{copy}"], r"being written by another privlm process \(pid \d+\)", setup=_hold_lock),
    Case("resume-with-spec", "resume", "a preset given together with --resume",
         ["train", "SM+LN+G", "--resume", "{copy}"], r"--resume takes the config from the run directory"),
    # --- eval --------------------------------------------------------------------------------------
    Case("eval-missing-run", "eval", "a run directory that does not exist", ["eval", "{tmp}/nope"],
         r"run directory '.*nope' does not exist"),
    Case("eval-no-weights", "eval", "a run without model.safetensors", ["eval", "{copy}"],
         r"missing model\.safetensors", setup=_remove("model.safetensors")),
    Case("eval-corrupt-weights", "eval", "a corrupt model.safetensors", ["eval", "{copy}"],
         r"model\.safetensors' is malformed: its header claims", setup=_write("model.safetensors", b"not safetensors")),
    Case("eval-bad-config", "eval", "a config.yaml with an unknown key", ["eval", "{copy}"],
         r"config\.yaml' is not a valid privlm config", setup=_write("config.yaml", "model:\n  n_layerz: 2\n")),
    Case("eval-batch-zero", "eval", "--batch-size 0", ["eval", "{run}", "--batch-size", "0"],
         r"argument --batch-size: 0 must be a positive integer"),
    Case("eval-data-none", "eval", "--data matching no files", ["eval", "{run}", "--data", "files:{tmp}/x/*.py"],
         r"matches no files"),
    Case("eval-data-jsonl", "eval", "--data with a malformed jsonl line",
         ["eval", "{run}", "--data", "files:{ctx:bad_jsonl}"], r"bad\.jsonl' line 2 is not valid JSON"),
    # --- sample ------------------------------------------------------------------------------------
    Case("sample-temperature-nan", "sample", "--temperature nan",
         ["sample", "{run}", "--prompt", "x", "--temperature", "nan"], r"--temperature: nan is not a finite number"),
    Case("sample-temperature-negative", "sample", "--temperature -1",
         ["sample", "{run}", "--prompt", "x", "--temperature", "-1"], r"--temperature: -1 must be 0 or in \[0\.0001, 10000\]"),
    Case("sample-non-utf8", "sample", "a prompt that is not UTF-8 (byte 0xff)",
         ["sample", "{run}", "--prompt", "a\udcffb"], r"--prompt is not valid UTF-8"),
    Case("sample-top-k-zero", "sample", "--top-k 0", ["sample", "{run}", "--prompt", "x", "--top-k", "0"],
         r"argument --top-k: 0 must be a positive integer"),
    Case("sample-no-prompt", "sample", "no --prompt", ["sample", "{run}"],
         r"the following arguments are required: --prompt"),
    Case("sample-empty-prompt", "sample", "an empty prompt", ["sample", "{run}", "--prompt", ""],
         r"--prompt is empty after tokenization"),
    Case("sample-tokens-word", "sample", "--max-new-tokens that is not a number",
         ["sample", "{run}", "--prompt", "x", "--max-new-tokens", "many"], r"--max-new-tokens: 'many' is not an integer"),
    # --- entropy -----------------------------------------------------------------------------------
    Case("entropy-missing-run", "entropy", "a run directory that does not exist", ["entropy", "{tmp}/nope"],
         r"does not exist"),
    Case("entropy-no-tokenizer", "entropy", "a run without tokenizer.json", ["entropy", "{copy}"],
         r"missing tokenizer\.json", setup=_remove("tokenizer.json")),
    Case("entropy-data-jsonl", "entropy", "--data with a malformed jsonl line",
         ["entropy", "{run}", "--data", "files:{ctx:bad_jsonl}"], r"bad\.jsonl' line 2 is not valid JSON"),
    # --- cost --------------------------------------------------------------------------------------
    Case("cost-unknown-preset", "cost", "a preset name that does not exist", ["cost", "SM+XYZ"], r"XYZ"),
    Case("cost-unknown-profile", "cost", "a cost profile that does not exist",
         ["cost", "SM+LN+G", "--profile", "nope"], r"nope"),
    Case("cost-renamed-spu-profile", "cost", "the SPU profile's old name",
         ["cost", "SM+LN+G", "--spu-profile", "bumblebee"], r"'bumblebee' is now 'puma'"),
    Case("cost-profile-and-spu-profile", "cost", "a cost profile and an SPU profile at once",
         ["cost", "SM+LN+G", "--profile", "paper-fit", "--spu-profile", "all"], r"not both"),
    Case("pi-measure-ring32", "cost", "a profile whose kernels run in another ring, run whole",
         ["pi", "measure", "SM+LN+G", "--spu-profile", "bumblebee-ring32"], r"cannot convert shares between rings"),
    Case("cost-bad-override", "cost", "an override of a key that does not exist",
         ["cost", "SM+LN+G", "model.layers=3"], r"unknown config key 'model\.layers'"),
    Case("cost-nan-override", "cost", "model.init_std=nan", ["cost", "SM+LN+G", "model.init_std=nan"],
         r"model\.init_std=nan must be a finite number"),
    Case("cost-missing-equals-path", "cost", "a missing run directory whose name has '='",
         ["cost", "{tmp}/sweep/sm-seed=1"], r"sm-seed=1' does not exist \(expected a preset name"),
    # --- report ------------------------------------------------------------------------------------
    Case("report-missing-run", "report", "a run directory that does not exist",
         ["report", "{tmp}/nope", "-o", "{tmp}/r.html"], r"nope"),
    Case("report-not-html", "report", "an output name that is not .html", ["report", "{run}", "-o", "{tmp}/r.txt"],
         r"must end in \.html"),
    # --- sweep -------------------------------------------------------------------------------------
    Case("sweep-missing-file", "sweep", "a sweep file that does not exist", ["sweep", "{tmp}/nope.yaml"],
         r"sweep file '.*nope\.yaml' does not exist"),
    Case("sweep-unknown-key", "sweep", "a sweep file with an unknown key",
         ["sweep", "{tmp}/s.yaml", "--list"], r"unknown key\(s\) \['epochs'\]",
         setup=_write("tmp:s.yaml", SWEEP_UNKNOWN_KEY)),
    Case("sweep-bad-yaml", "sweep", "a sweep file that is not YAML", ["sweep", "{tmp}/s.yaml", "--list"],
         r"is not valid YAML", setup=_write("tmp:s.yaml", SWEEP_BAD_YAML)),
    Case("sweep-nan-override", "sweep", "a sweep whose overrides set train.lr=nan",
         ["sweep", "{tmp}/s.yaml", "--list"], r"train\.lr=nan must be a finite number",
         setup=_write("tmp:s.yaml", SWEEP_BAD_OVERRIDE)),
    # --- data --------------------------------------------------------------------------------------
    Case("data-no-files", "data", "data.source glob matching nothing", ["data", "data.source=files:{tmp}/x/*.py"],
         r"matches no files"),
    Case("data-bad-scheme", "data", "an unknown data.source scheme", ["data", "data.source=ftp:x"],
         r"data\.source='ftp:x' is not allowed"),
    Case("data-bad-jsonl", "data", "a jsonl file with a malformed line",
         ["data", "data.source=files:{ctx:bad_jsonl}", "data.cache_dir={tmp}/c"], r"bad\.jsonl' line 2 is not valid JSON"),
    Case("data-hf-offline", "data", "an hf: dataset with no network and no cache",
         ["data", "data.source=hf:someone/not-cached", "data.cache_dir={tmp}/c"],
         r"cannot load dataset 'someone/not-cached' .*not reachable .*not in the local cache",
         env={"HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf"}),
    Case("data-small-vocab", "data", "data.vocab_size too small for byte-level BPE", ["data", "data.vocab_size=100"],
         r"data\.vocab_size=100 is too small"),
    Case("data-valid-fraction", "data", "data.valid_fraction=1", ["data", "data.valid_fraction=1"],
         r"data\.valid_fraction=1\.0 must be in \[0, 1\)"),
    # --- pi (input checks before any 2PC) ---------------------------------------------------------------
    Case("pi-no-subcommand", "pi", "pi without a subcommand", ["pi"], r"required: PI_COMMAND|pi_command"),
    Case("pi-missing-run", "pi", "a run directory that does not exist", ["pi", "run", "{tmp}/nope", "--prompt", "x"],
         r"does not exist"),
    Case("pi-bad-tokens", "pi", "--tokens that are not integers", ["pi", "run", "{run}", "--tokens", "1,x"],
         r"--tokens '1,x' must be comma-separated integers"),
    # --- pi generate (checked before anything is traced or started) -------------------------------------
    Case("pi-generate-zero-new", "pi", "generate --max-new-tokens 0",
         ["pi", "generate", "{run}", "--tokens", "1,2", "--max-new-tokens", "0"], r"--max-new-tokens=0 must be >= 1"),
    Case("pi-generate-negative-new", "pi", "generate --max-new-tokens -3",
         ["pi", "generate", "{run}", "--tokens", "1,2", "--max-new-tokens", "-3"], r"--max-new-tokens=-3 must be >= 1"),
    Case("pi-generate-beyond-positions", "pi", "generate: prompt + new tokens beyond the model's positions",
         ["pi", "generate", "{run}", "--tokens", "1,2", "--max-new-tokens", "100000"],
         r"need 100002 positions; the model has \d+"),
    Case("pi-generate-empty-prompt", "pi", "generate with an empty prompt", ["pi", "generate", "{run}", "--prompt", ""],
         r"the prompt is empty after tokenization"),
    Case("pi-generate-unknown-profile", "pi", "generate with an unknown SPU profile",
         ["pi", "generate", "{run}", "--prompt", "x", "--spu-profile", "nope"], r"unknown SPU profile 'nope'"),
    Case("pi-generate-top-k-greedy", "pi", "generate --top-k without --temperature (greedy)",
         ["pi", "generate", "{run}", "--prompt", "x", "--top-k", "5"], r"--top-k needs --temperature"),
    # --- pi generate / pi run with the exports of `pi export` (checked before any 2PC work) ------------------
    Case("pi-generate-bundle-wrong-P", "pi", "a generation client bundle given a prompt of another length",
         ["pi", "generate", "{tmp}/gen", "--mode", "2proc", "--party", "0", "--tokens", "1,2", "--max-new-tokens", "2"],
         r"the prompt has 2 tokens but the export's programs were made for 3 \(privlm pi export --T\)",
         setup=lambda copy, tmp: _gen_bundle(tmp / "gen", 3, 5)),
    Case("pi-generate-bundle-too-many", "pi", "more new tokens than the generation bundle was exported for",
         ["pi", "generate", "{tmp}/gen", "--mode", "2proc", "--party", "0", "--tokens", "1,2,3", "--max-new-tokens",
          "4"], r"--max-new-tokens=4 is more than the 3 the export was made for",
         setup=lambda copy, tmp: _gen_bundle(tmp / "gen", 3, 5)),
    Case("pi-generate-bundle-sim", "pi", "a generation client bundle run as both parties (it holds no weights)",
         ["pi", "generate", "{tmp}/gen", "--tokens", "1,2,3", "--max-new-tokens", "2"],
         r"is the client half of a generation export: run it with --mode 2proc --party 0",
         setup=lambda copy, tmp: _gen_bundle(tmp / "gen", 3, 5)),
    Case("pi-generate-bundle-no-sel", "pi", "a generation bundle whose decode program.json lacks its position input",
         ["pi", "generate", "{tmp}/gen", "--mode", "2proc", "--party", "0", "--tokens", "1,2,3"],
         r"decode/program\.json' is malformed: it lacks the field 'inputs\.sel'",
         setup=lambda copy, tmp: _gen_bundle(tmp / "gen", 3, 5, inputs={})),
    Case("pi-generate-run-bundle", "pi", "the client bundle of `pi export` (for pi run) given to pi generate",
         ["pi", "generate", "{tmp}/bundle", "--mode", "2proc", "--party", "0", "--tokens", "1"],
         r"is an export for `privlm pi run` \(one program\); `pi generate` needs a model or an export made with "
         r"--max-new-tokens",
         setup=_json("tmp:bundle/program.json", {"format": "privlm-trace/1", "T": 1, "vocab_size": 512})),
    Case("pi-run-generate-bundle", "pi", "the client bundle of `pi export --max-new-tokens` given to pi run",
         ["pi", "run", "{tmp}/gen", "--mode", "2proc", "--party", "0", "--tokens", "1,2,3"],
         r"is an export for `privlm pi generate` \(prefill/ and decode/ programs\); `pi run` needs a model or an "
         r"export made without --max-new-tokens", setup=lambda copy, tmp: _gen_bundle(tmp / "gen", 3, 5)),
    Case("pi-export-generate-beyond", "pi", "pi export --max-new-tokens beyond the model's positions",
         ["pi", "export", "{run}", "{tmp}/out", "--T", "60", "--max-new-tokens", "10"],
         r"--T=60 \+ --max-new-tokens=10 need 70 positions; the model has 64"),
    Case("pi-export-generate-zero", "pi", "pi export --max-new-tokens 0",
         ["pi", "export", "{run}", "{tmp}/out", "--T", "4", "--max-new-tokens", "0"], r"--max-new-tokens=0 must be >= 1"),
    # --- pi: the 2PC addresses and timeout (checked before anything is exported or started) -------------
    *[Case(f"pi-peer-{name}", "pi", what, ["pi", "run", "{run}", "--prompt", "x", "--mode", "2proc", *argv], expect)
      for name, what, argv, expect in [
          ("no-port", "--peer without a port", ["--peer", "localhost", "--peer", "127.0.0.1:9531"],
           r"--peer 'localhost' \(party 0\) must be HOST:PORT"),
          ("no-host", "--peer without a host", ["--peer", ":9530", "--peer", "127.0.0.1:9531"], r"must be HOST:PORT"),
          ("same-twice", "the same address for both parties", ["--peer", "127.0.0.1:9530", "--peer", "127.0.0.1:9530"],
           r"are the same address"),
          ("same-by-name", "one address given by name and by number", ["--peer", "localhost:9530", "--peer",
                                                                      "127.0.0.1:9530"], r"are the same address"),
          ("port-range", "a port above 65535", ["--peer", "127.0.0.1:9530", "--peer", "127.0.0.1:70000"],
           r"port '70000' must be a number in 1\.\.65535"),
          ("port-zero", "port 0", ["--peer", "127.0.0.1:0", "--peer", "127.0.0.1:9531"], r"port '0' must be"),
          ("port-word", "a port that is not a number", ["--peer", "127.0.0.1:http", "--peer", "127.0.0.1:9531"],
           r"port 'http' must be"),
          ("unresolvable", "a host that does not resolve", ["--peer", "no-such-host.invalid:9530", "--peer",
                                                            "127.0.0.1:9531"], r"host 'no-such-host\.invalid' does not resolve"),
          ("ipv6-bare", "an IPv6 host without brackets", ["--peer", "::1:9530", "--peer", "127.0.0.1:9531"],
           r"IPv6 host goes in brackets"),
          ("once", "--peer given once", ["--peer", "127.0.0.1:9530"], r"exactly twice .* got 1"),
          ("three", "--peer given three times", ["--peer", "127.0.0.1:9530", "--peer", "127.0.0.1:9531", "--peer",
                                                 "127.0.0.1:9532"], r"exactly twice .* got 3"),
          ("timeout-zero", "--peer-timeout 0", ["--peer-timeout", "0"], r"--peer-timeout: 0 must be between 1 and"),
          ("timeout-nan", "--peer-timeout nan", ["--peer-timeout", "nan"], r"--peer-timeout: nan is not a finite"),
          ("timeout-huge", "--peer-timeout 1e9", ["--peer-timeout", "1e9"], r"must be between 1 and 86400"),
      ]],
    # --- run-directory safety (rundir: links, outputs, one-line paths; tests/test_rundir_safety.py) ---------
    Case("resume-lock-symlink", "resume", "a run whose .lock is a link to a file outside it",
         ["train", "--resume", "{copy}"], r"\.lock' is a symbolic link", setup=lambda c, t: _link(c, t, ".lock")),
    Case("resume-state-symlink", "resume", "a run whose state/ is a link to another run's checkpoints",
         ["train", "--resume", "{copy}"], r"state' is a symbolic link", setup=lambda c, t: _link(c, t, "state")),
    Case("resume-history-symlink", "resume", "a run whose config_history.jsonl is a link to an outside file",
         ["train", "--resume", "{copy}", "train.lr=1e-3"], r"config_history\.jsonl' is a symbolic link",
         setup=lambda c, t: _link(c, t, "config_history.jsonl")),
    Case("resume-step-symlink", "resume", "a run whose state/step-N is a link to another run's checkpoint",
         ["train", "--resume", "{copy}"], r"step-00000001' is a symbolic link",
         setup=lambda c, t: _link(c, t, "state/step-00000001")),
    Case("sweep-out-is-run", "sweep", "--out an existing run directory", ["sweep", "{tmp}/s.yaml", "--out", "{copy}"],
         r"is a run directory \(it holds config\.yaml\)", setup=_write("tmp:s.yaml", "name: s\nruns: [SM+LN+G]\n")),
    Case("export-hf-out-symlink", "export-hf", "OUT_DIR is a link to an empty directory",
         ["export-hf", "{run}", "{tmp}/out"], r"out' is a symbolic link", setup=lambda c, t: _link(c, t, "tmp:out")),
    Case("eval-newline-path", "eval", "a run path containing a newline", ["eval", "{tmp}/a\nb"],
         r"a\\nb' does not exist"),
]


def _gen_bundle(where: Path, P: int, C: int, inputs: Optional[dict] = None) -> None:
    """The program.json files of a generation client bundle (`pi export --max-new-tokens C - P + 1`) for a
    vocabulary of 512: a prefill of P tokens, a decode step with a cache of C positions."""
    sel = {"sel": {"kind": "public", "shape": [1, C], "dtype": "float32"}}
    for name, doc in (("prefill", {"T": P}), ("decode", {"T": 1, "inputs": sel if inputs is None else inputs})):
        (where / name).mkdir(parents=True)
        (where / name / "program.json").write_text(json.dumps({"format": "privlm-trace/1", "vocab_size": 512, **doc}))


def _link(copy: Path, tmp: Path, rel: str) -> None:
    """Replace ``rel`` of the run copy (or of the case directory, 'tmp:...') with a link to something outside:
    a file for a file, a copy of the run's state for a directory, an empty directory for a new name."""
    where = tmp / rel.removeprefix("tmp:") if rel.startswith("tmp:") else copy / rel
    outside = tmp / "outside"
    if where.is_dir():
        shutil.copytree(where, outside)
        shutil.rmtree(where)
    elif where.exists():
        outside.write_bytes(where.read_bytes())
        where.unlink()
    elif where.parent.name == "state":
        shutil.copytree(_ckpt(copy), outside)
    else:
        outside.mkdir()
    where.symlink_to(outside)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def all_cases() -> list[Case]:
    """The command cases, then those of the validation layer (files, sizes, bounds, values)."""
    return CASES + VALIDATION_CASES


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    over = stdlib_corpus_overrides(root, 12)
    run = root / "run"
    over_run = over + ["train.max_steps=4", "train.batch_size=4", "train.save_every=2", "train.eval_every=4",
                       "train.log_every=2", "train.entropy_every=2", "train.eval_max_batches=2"]
    assert main(["train", "SM+LN+G", *over_run, "--out", str(run), "--quiet"]) == 0
    (root / "file").write_text("a regular file\n")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    bad_jsonl = root / "jsonl" / "bad.jsonl"
    bad_jsonl.parent.mkdir()
    bad_jsonl.write_text(BAD_JSONL)
    return {"root": root, "run": run, "file": root / "file", "corpus": root / "corpus", "bad_yaml": root / "bad.yaml",
            "bad_jsonl": bad_jsonl, "data_files": over[0], "overrides": over}


def _fill(text: str, ctx: dict, tmp: Path, copy: Path) -> str:
    text = re.sub(r"\{ctx:(\w+)\}", lambda m: str(ctx[m.group(1)]), text)
    return text.replace("{run}", str(ctx["run"])).replace("{copy}", str(copy)).replace("{tmp}", str(tmp))


def prepare(case: Case, ctx: dict, tmp: Path) -> tuple[list[str], dict]:
    copy = tmp / "run-copy"
    if any("{copy}" in a for a in case.argv):
        shutil.copytree(ctx["run"], copy)
    if case.setup is not None:
        case.setup(copy, tmp)
    argv = [_fill(a, ctx, tmp, copy) for a in case.argv]
    env = {k: _fill(v, ctx, tmp, copy) for k, v in (case.env or {}).items()}
    return argv, env


RESULTS: dict[str, tuple[Case, list[str], str]] = {}


def _display(text: str, ctx: dict, tmp: Path) -> str:
    for path, name in ((tmp / "run-copy", "RUN"), (ctx["run"], "RUN"), (tmp, "TMP"), (ctx["root"], "TMP")):
        text = text.replace(str(path), name)
    return re.sub(r"pid \d+", "pid N", text)


@pytest.mark.parametrize("case", all_cases(), ids=[c.id for c in all_cases()])
def test_bad_input_is_one_line(case, ctx, tmp_path, capsys, monkeypatch):
    argv, env = prepare(case, ctx, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _digest(ctx["root"]), _digest(tmp_path)
    capsys.readouterr()
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors exit through SystemExit
            code = exc.code
    finally:
        while _HELD:
            _HELD.pop().release()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"{case.id}: exit 0; stderr: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{case.id}: {len(lines)} stderr lines:\n{err}"
    assert re.search(case.expect, lines[0]), f"{case.id}: {lines[0]!r} does not match {case.expect!r}"
    after = _digest(ctx["root"]), _digest(tmp_path)
    for old, new in zip(before, after):  # nothing lost or changed (new files, e.g. a refused run's dir, may appear)
        assert {k: new.get(k) for k in old} == old, f"{case.id} changed or removed files"
    RESULTS[case.id] = (case, _display(_argv_text(argv), ctx, tmp_path), _display(lines[0], ctx, tmp_path))


def test_bad_input_table_covers_every_command():
    cases = all_cases()
    groups = {c.command for c in cases}
    assert {"train", "resume", "eval", "sample", "entropy", "cost", "report", "sweep", "data", "pi"} <= groups
    assert len({c.id for c in cases}) == len(cases) >= 40
    assert len(VALIDATION_CASES) >= 100


def test_docs_table_lists_every_case():
    text = DOC.read_text()
    missing = [c.id for c in all_cases() if f"`{c.id}`" not in text]
    assert not missing, f"docs/bad-inputs.md lacks {missing}; regenerate it (see this module's docstring)"
    assert f"{len(all_cases())} cases" in text


SUBPROCESS_SAMPLE = ["train-lr-inf", "resume-malformed-rng", "eval-missing-run", "sample-non-utf8",
                     "cost-nan-override", "data-bad-jsonl", "sweep-missing-file", "runcfg-alias-bomb",
                     "st-absurd-header", "weights-nan-sample", "pi-prompt-non-utf8", "train-embd-1e5",
                     "flag-sample--seed-2e70"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_SAMPLE)
def test_bad_inputs_in_a_real_subprocess(case_id, ctx, tmp_path):
    case = next(c for c in all_cases() if c.id == case_id)
    argv, env = prepare(case, ctx, tmp_path)
    script = Path(sys.executable).parent / "privlm"
    cmd = [str(script), *argv] if script.exists() else [sys.executable, "-m", "privlm.cli", *argv]
    # a real non-UTF-8 byte in argv: the surrogate the in-process case uses stands for it
    cmd = [a.encode("utf-8", "surrogateescape") for a in cmd]
    res = subprocess.run(cmd, capture_output=True, env={**os.environ, **env}, timeout=300)
    err = res.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert res.returncode != 0 and "Traceback" not in err and len(lines) == 1, err
    assert re.search(case.expect, lines[0]), lines[0]


def _argv_text(argv: list[str]) -> str:
    shown = [a.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for a in argv]
    return " ".join(a if a and " " not in a and a.isprintable() else repr(a) for a in shown)


@pytest.fixture(scope="module", autouse=True)
def _write_doc():
    yield
    cases = all_cases()
    if os.environ.get("PRIVLM_WRITE_BAD_INPUTS_DOC") != "1" or len(RESULTS) != len(cases):
        return
    out = ["# Bad inputs and what privlm says", "",
           "Every row is a case of `tests/test_bad_inputs.py`, which runs it through the `privlm` command and checks "
           "a non-zero exit, exactly one line on stderr naming the problem, no Python traceback, and that no "
           "existing file was removed or changed. `RUN` is a small trained run directory, `TMP` a scratch "
           "directory. Regenerate with `PRIVLM_WRITE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py`.", ""]
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    for group in dict.fromkeys(c.command for c in cases):
        out += [f"## {group}", "", "| case | bad input | command | message (stderr) |", "|---|---|---|---|"]
        for c in cases:
            if c.command == group:
                case, cmd, msg = RESULTS[c.id]
                env = " ".join(f"{k}=…" for k in (case.env or {}))
                out.append(f"| `{c.id}` | {cell(c.what)} | `{cell((env + ' ' if env else '') + 'privlm ' + cmd)}` "
                           f"| {cell(msg)} |")
        out.append("")
    out += [f"{len(cases)} cases over {len({c.command for c in cases})} commands; none prints a traceback, each "
            f"prints exactly one line and exits non-zero, and none removes or changes an existing file.", ""]
    DOC.write_text("\n".join(out))
