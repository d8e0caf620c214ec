"""One validation layer for every file privlm reads from a run, sweep or model directory, and the checks made
before anything is allocated.

* Files: ``read_json`` / ``read_jsonl`` / ``check_yaml`` bound the file size, the nesting depth and (YAML) the
  alias expansion before any object is built, and check the parsed value against its schema (``SCHEMAS``, one
  entry per file kind; config.yaml's schema is the Config dataclasses, checked by ``privlm.config.from_dict``).
  ``safetensors_header`` reads the 8-byte header length and bounds it by the file before the safetensors
  library reads anything, then checks every tensor's dtype, shape and byte range.
* Values: ``check_finite`` (weights with NaN/inf), ``check_token_ids`` (ids against a vocabulary),
  ``check_text`` (text that is not UTF-8, e.g. undecodable argv bytes).
* Memory: ``gpt_memory`` estimates the bytes a model (and a batch through it) needs, ``check_fits`` refuses
  with one line when that exceeds the machine's available memory (MemAvailable, or the CUDA device's free memory).

Every failure is one line naming the file and the field (``CheckpointError`` for files of a run or model
directory, ``ConfigError`` for configs and sweep files, ``ResourceError`` for sizes that cannot fit).
Light imports only (json, yaml on demand); torch is imported lazily by the functions that take tensors.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from privlm.errors import CheckpointError, ConfigError, PrivlmError, ResourceError

# --- bounds --------------------------------------------------------------------------------------------
MAX_JSON_BYTES = 64 * 2**20      # summary/entropy/manifest/trace/sweep state/HF config/tokenizer_config
MAX_TOKENIZER_BYTES = 256 * 2**20  # tokenizer.json / vocab.json / merges.txt of the largest vocabularies
MAX_JSONL_BYTES = 1024 * 2**20   # metrics.jsonl / config_history.jsonl of a long run
MAX_YAML_BYTES = 64 * 2**10      # config.yaml, sweep files (16x the largest shipped one); the pure-Python YAML
                                 # parser OmegaConf uses is slow, so this also bounds the time of a parse
MAX_DEPTH = 32                   # nesting of any JSON/YAML document privlm writes is <= 6
MAX_YAML_NODES = 200_000         # nodes after alias expansion (a "billion laughs" file has 10^9)
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit

SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


# --- schemas -------------------------------------------------------------------------------------------
class Opt:
    """Schema of a value that may also be null."""

    def __init__(self, spec: Any):
        self.spec = spec


class Matrix:
    """Schema of a rectangular [rows][cols] list of numbers (null = NaN), e.g. per-layer per-head entropy."""


NUMBER = "number"     # int or float (JSON null stands for NaN/inf where the writer uses strict_json)
ANY = "any"
MATRIX = Matrix()

# One schema per file kind: {"key": spec} required, {"key?": spec} optional; extra keys are allowed (files
# grow new fields). Specs: a type, NUMBER, ANY, Opt(spec), [spec] (a list of spec), {...} (a mapping).
SCHEMAS: dict[str, Any] = {
    "summary.json": {"preset?": str, "params?": int, "tokens_trained?": int, "steps": int,
                     "final_loss?": Opt(NUMBER), "final_ppl?": Opt(NUMBER), "diverged?": bool,
                     "diagnosis?": ANY, "unigram_loss?": Opt(NUMBER), "unigram_ppl?": Opt(NUMBER)},
    "entropy.json": {"step?": int, "seq_len?": int, "head_entropy": Opt(MATRIX), "thresholds?": Opt(MATRIX),
                     "temperatures?": ANY},
    "metrics.jsonl": {"kind": str, "step": int, "loss?": Opt(NUMBER), "ppl?": Opt(NUMBER),
                      "head_entropy?": Opt(MATRIX), "layer_mean?": Opt([Opt(NUMBER)]),
                      "nan_counts?": Opt([Opt(NUMBER)]), "tokens?": Opt(int), "lr?": Opt(NUMBER),
                      "grad_norm?": Opt(NUMBER)},
    "flight_recorder.json": {"format": str, "divergence_step": int, "what?": str, "loss?": Opt(NUMBER),
                             "grad_norm?": Opt(NUMBER), "records": [{"step": int, "loss?": Opt(NUMBER),
                                                                     "grad_norm?": Opt(NUMBER),
                                                                     "head_entropy": MATRIX, "max_logit": MATRIX,
                                                                     "resid_norm": [Opt(NUMBER)]}],
                             "at_divergence?": Opt({"step": int, "head_entropy": MATRIX, "max_logit": MATRIX,
                                                    "resid_norm": [Opt(NUMBER)]}),
                             "verdict?": Opt(dict)},
    "pi_measured.json": {"bytes_total?": Opt(NUMBER), "protocol?": Opt(str)},
    "data_manifest.json": {"splits": {"train": dict, "valid": dict}, "tokenizer": {"vocab_size?": int,
                                                                                  "eos_id?": Opt(int)},
                           "seq_len?": int},
    "config_history.jsonl": {"step?": Opt(int), "changes?": dict},
    "sweep.json": {"runs?": {"*": dict}, "command?": Opt(str)},
    "trainer.json": {"step": int, "tokens?": int, "position?": dict},
    "config.json": {"model_type": str},
    "program.json": {"format": str, "T": int, "vocab_size": int},
    "tokenizer_config.json": {},
    "selection.json": {"format": str, "overrides": [str], "not_finished?": [str], "selected?": Opt(str)},
}


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _spec_text(spec: Any) -> str:
    if isinstance(spec, Opt):
        return _spec_text(spec.spec) + " or null"
    if spec is NUMBER:
        return "a number"
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, Matrix):
        return "a rectangular list of lists of numbers"
    if isinstance(spec, dict) or spec is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", bool: "true/false", float: "a number"}.get(spec, str(spec))


def _matches(value: Any, spec: Any) -> bool:
    if spec is ANY:
        return True
    if isinstance(spec, Opt):
        return value is None or _matches(value, spec.spec)
    if spec is NUMBER or spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec, list):
        return isinstance(value, list)
    if isinstance(spec, Matrix):
        return (isinstance(value, list) and all(isinstance(r, list) for r in value)
                and len({len(r) for r in value}) <= 1
                and all(v is None or _matches(v, NUMBER) for r in value for v in r))
    if isinstance(spec, dict):
        return isinstance(value, dict)
    return isinstance(value, spec)


def check_schema(value: Any, spec: Any, where: str = "") -> Optional[str]:
    """None when ``value`` matches ``spec``; else the dotted field and what it should be, e.g.
    ``'records[3].step' must be an integer (got a string)``."""
    if not _matches(value, spec):
        return f"{f'{where!r} ' if where else ''}must be {_spec_text(spec)} (got {_kind(value)})"
    if isinstance(spec, Opt):
        return None if value is None else check_schema(value, spec.spec, where)
    if isinstance(spec, list) and spec:
        for i, item in enumerate(value):
            bad = check_schema(item, spec[0], f"{where}[{i}]")
            if bad:
                return bad
    if isinstance(spec, dict):
        for key, sub in spec.items():
            if key == "*":
                for k, v in value.items():
                    bad = check_schema(v, sub, f"{where}.{k}" if where else str(k))
                    if bad:
                        return bad
                continue
            name = key.rstrip("?")
            field = f"{where}.{name}" if where else name
            if name not in value:
                if not key.endswith("?"):
                    return f"lacks the field '{field}'"
                continue
            bad = check_schema(value[name], sub, field)
            if bad:
                return bad
    return None


# --- files ---------------------------------------------------------------------------------------------
def _limit_size(path: Path, max_bytes: int, error: type) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"'{path}' does not exist") from None
    if not path.is_file():
        raise error(f"'{path}' is not a regular file")
    if size > max_bytes:
        raise error(f"'{path}' is {size:,} bytes, more than the {max_bytes:,} such a file may have")
    return size


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a deep document must not exhaust the interpreter's stack here either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _read_text(path: Path, max_bytes: int, error: type) -> str:
    _limit_size(path, max_bytes, error)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"'{path}' is not UTF-8 text (byte {exc.start})") from None


def parse_json(text: str, where: str, error: type = CheckpointError) -> Any:
    """json.loads with the depth bound and one-line errors (``where`` names the file, and line)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where} is nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if _depth(value) > MAX_DEPTH:
        raise error(f"{where} is nested deeper than {MAX_DEPTH} levels")
    return value


def read_json(path: Path | str, schema: Any = None, *, kind: Optional[str] = None, error: type = CheckpointError,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, size- and depth-bounded and checked against ``schema`` (default ``SCHEMAS[kind or name]``)."""
    path = Path(path)
    value = parse_json(_read_text(path, max_bytes, error), f"'{path}'", error)
    return check_file(value, path, schema, kind=kind, error=error)


def check_file(value: Any, path: Path | str, schema: Any = None, *, kind: Optional[str] = None,
               error: type = CheckpointError) -> Any:
    """``value`` (read from ``path``) checked against ``schema`` (default ``SCHEMAS[kind or file name]``);
    one line naming the file and the field otherwise."""
    path = Path(path)
    spec = schema if schema is not None else SCHEMAS.get(kind or path.name)
    if spec is not None:
        bad = check_schema(value, spec)
        if bad:
            raise error(f"'{path}' is malformed: {'it ' if bad.startswith(('must', 'lacks')) else ''}{bad}")
    return value


def read_jsonl(path: Path | str, schema: Any = None, *, kind: Optional[str] = None, error: type = CheckpointError,
               torn_tail: bool = True, max_bytes: int = MAX_JSONL_BYTES) -> list:
    """Records of a JSON-lines file, each checked against ``schema`` (default ``SCHEMAS[kind or name]``). A torn
    last line (the writer was killed mid-line: no final newline) is dropped when ``torn_tail``; a bad line elsewhere
    is an error."""
    path = Path(path)
    text = _read_text(path, max_bytes, error)
    lines, torn = text.splitlines(), torn_tail and not text.endswith("\n")  # every record ends with a newline
    spec = schema if schema is not None else SCHEMAS.get(kind or path.name)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = parse_json(line, f"'{path}' line {i + 1}", error)
        except PrivlmError:
            if torn and i == len(lines) - 1:
                break
            raise
        if spec is not None:
            bad = check_schema(rec, spec)
            if bad:
                raise error(f"'{path}' line {i + 1} is malformed: {'it ' if bad.startswith(('must', 'lacks')) else ''}"
                            f"{bad}")
        records.append(rec)
    return records


def check_yaml(path: Path | str, error: type = ConfigError, what: str = "config file") -> str:
    """The text of a YAML file after bounding its size, nesting and alias expansion (a "billion laughs" file
    refers to one anchor from many aliases: it is refused before any object is built from it)."""
    import yaml

    path = Path(path)
    text = _read_text(path, MAX_YAML_BYTES, error)
    if _flow_depth(text) > MAX_DEPTH:  # before the recursive parser sees it
        raise error(f"{what} '{path}' is nested deeper than {MAX_DEPTH} levels")
    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except RecursionError:
        raise error(f"{what} '{path}' is nested deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if node is None:
        return text
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n, depth: int) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise error(f"{what} '{path}' refers to itself through an alias (line {n.start_mark.line + 1})")
        if depth > MAX_DEPTH:
            raise error(f"{what} '{path}' is nested deeper than {MAX_DEPTH} levels")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c, depth + 1) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        if total > MAX_YAML_NODES:
            raise error(f"{what} '{path}' expands to more than {MAX_YAML_NODES:,} values through its aliases "
                        f"(line {n.start_mark.line + 1})")
        active.discard(key)
        sizes[key] = total
        return total

    size(node, 1)
    return text


def _flow_depth(text: str) -> int:
    """Deepest nesting of YAML flow collections ([...] / {...}), quoted strings skipped."""
    import re

    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", re.sub(r"'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"", "", text)):
        depth = depth + 1 if m.group() in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


def read_yaml(path: Path | str, error: type = ConfigError, what: str = "config file") -> Any:
    """A bounded YAML file (``check_yaml``) parsed with the safe loader."""
    import yaml

    text = check_yaml(path, error, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                  "added_tokens.json")
TOKENIZER_TEXT = ("merges.txt",)


def check_tokenizer_files(path: Path | str, error: type = CheckpointError) -> None:
    """Tokenizer files of a run or model directory (or one tokenizer.json), before a tokenizer library reads
    them: sizes bounded, the JSON ones parsed with the depth bound and checked to be mappings
    (tokenizer.json must have a ``model``)."""
    path = Path(path)
    files = [path] if path.is_file() else [path / n for n in TOKENIZER_JSON + TOKENIZER_TEXT if (path / n).is_file()]
    for f in files:
        if f.name in TOKENIZER_TEXT:
            _limit_size(f, MAX_TOKENIZER_BYTES, error)
            continue
        read_json(f, {"model": dict} if f.name == "tokenizer.json" else {}, error=error,
                  max_bytes=MAX_TOKENIZER_BYTES)


def read_run_config_dict(path: Path | str) -> dict:
    """config.yaml of a run directory as a mapping (its schema, the Config dataclasses, is checked by
    ``privlm.config.from_dict``)."""
    path = Path(path)
    raw = read_yaml(path, CheckpointError, "run config")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"'{path}' is not a valid privlm config: it must be a mapping of sections "
                              f"(model/data/train/reg), got {_kind(raw)}")
    return raw


def safetensors_header(path: Path | str, error: type = CheckpointError) -> dict:
    """The header of a .safetensors file, read by hand with every length bounded by the file itself (the
    library would otherwise try to allocate whatever the first 8 bytes claim). Checks each tensor's dtype,
    shape and byte range; returns {name: {"dtype", "shape", "data_offsets"}} (plus "__metadata__")."""
    path = Path(path)
    size = _limit_size(path, 2**63, error)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise error(f"'{path}' is malformed: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise error(f"'{path}' is malformed: its header claims {n:,} bytes but the file has {size - 8:,} "
                        f"after the length field")
        raw = fh.read(n)
    try:
        header = parse_json(raw.decode("utf-8"), f"'{path}' header", error)
    except UnicodeDecodeError:
        raise error(f"'{path}' is malformed: its header is not UTF-8") from None
    if not isinstance(header, dict):
        raise error(f"'{path}' is malformed: its header is {_kind(header)}, not a mapping")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise error(f"'{path}' is malformed: __metadata__ must map names to strings")
            continue
        bad = check_schema(entry, {"dtype": str, "shape": [int], "data_offsets": [int]}, name)
        if bad:
            raise error(f"'{path}' is malformed: tensor {bad}")
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise error(f"'{path}' is malformed: tensor '{name}' has unknown dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if any(d < 0 for d in shape) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= data_len:
            raise error(f"'{path}' is malformed: tensor '{name}' has shape {shape} and bytes {offsets} outside "
                        f"the file's {data_len:,} data bytes")
        if math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]] != offsets[1] - offsets[0]:
            raise error(f"'{path}' is malformed: tensor '{name}' of shape {shape} ({entry['dtype']}) does not "
                        f"match its {offsets[1] - offsets[0]:,} bytes")
    return header


# --- values --------------------------------------------------------------------------------------------
def check_finite(named_tensors: Iterable, where: str, error: type = CheckpointError) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor (e.g. a model that diverged and was
    saved anyway, or a tampered file): they would only surface later as a crash in sampling."""
    import torch

    for name, t in named_tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise error(f"{where} has non-finite weights: {bad:,} NaN/inf value{'s' if bad != 1 else ''} in "
                        f"'{name}'")


def check_intervals(value: Any, where: str, error: type = CheckpointError) -> list[list[float]]:
    """``value`` as a list of [start, end] pairs of finite numbers (a run's stretches of training in sweep.json and
    results.json); one line naming ``where`` otherwise."""
    if isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        and math.isfinite(x) for x in p) for p in value):
        return [[float(a), float(b)] for a, b in value]
    raise error(f"{where} must be a list of [start, end] pairs of Unix seconds")


def check_token_ids(ids, vocab_size: int, what: str, error: type = PrivlmError) -> None:
    """Every id in 0..vocab_size-1 (a list, or a numpy array / memmap of token ids)."""
    import numpy as np

    arr = np.asarray(ids)
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise error(f"{what} has token id {bad}, outside the model's vocabulary 0..{vocab_size - 1}")


def check_text(text: str, what: str, error: type = ConfigError) -> str:
    """``text`` as given on the command line must be UTF-8: undecodable bytes arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} is not valid UTF-8 text (undecodable byte at character {exc.start}); "
                    f"pass it in UTF-8") from None
    return text


# --- memory --------------------------------------------------------------------------------------------
def available_bytes(device: Any = "cpu") -> Optional[int]:
    """Memory a new allocation can use: the CUDA device's free memory, else /proc/meminfo's MemAvailable
    (None where neither is known)."""
    dev = str(device)
    if dev.startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(torch.device(dev))[0])
        except Exception:  # noqa: BLE001 - no CUDA: fall back to host memory
            pass
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit = os.environ.get("PRIVLM_MEMORY_LIMIT", "").strip()  # bytes: a budget below MemAvailable (shared hosts)
    if limit:
        try:
            budget = int(limit)
        except ValueError:
            budget = 0
        if budget <= 0:
            raise ConfigError(f"PRIVLM_MEMORY_LIMIT='{limit}' must be a positive number of bytes")
        have = min(budget, have) if have is not None else budget
    return have


def gpt_param_count(m) -> int:
    """Parameters of a privlm GPT of ModelConfig ``m`` from the sizes alone (no module built): the matrices
    and vectors of ``privlm.model``; the count ``GPT.num_params()`` reports, up to the small scale vectors."""
    d, L, V, H = m.n_embd, m.n_layer, m.vocab_size, m.n_head
    h = m.ffn_hidden if m.ffn_hidden is not None else 4 * d
    b = 1 if m.bias else 0
    attn = 4 * d * d + 4 * d * b
    n_ffn = len(m.ffn_layers()) if m.ffn_keep_layers is not None else max(0, L - m.ffn_prune_deepest)
    ffn = (d * d + d * b) if m.ffn == "fused" else (2 * d * h + (h + d) * b)
    ln = d * (1 + b)  # LayerNorm weight (and bias)
    norms = 2 * ln if m.norm == "layernorm" else 0
    temp = H * m.block_size if m.attn_temperature else 0
    emb = V * d + m.block_size * d + (0 if m.tie_embeddings else V * d)
    return L * (attn + norms + temp) + n_ffn * ffn + emb + (ln if m.ln_f else 0)


def gpt_memory(m, batch: int = 0, T: int = 0, training: bool = False, bytes_per: int = 4) -> int:
    """A lower estimate of the bytes a GPT of ModelConfig ``m`` needs: its weights (plus gradients and AdamW's
    two moments when ``training``) and the activations of ``batch`` sequences of ``T`` tokens (the residual
    stream and attention/FFN intermediates of one layer kept per layer when training, and the logits)."""
    params = gpt_param_count(m)
    weights = params * bytes_per * (4 if training else 1)
    d, L, V = m.n_embd, m.n_layer, m.vocab_size
    h = m.ffn_hidden if m.ffn_hidden is not None else 4 * d
    per_token = (L if training else 1) * (4 * d + h) + 2 * V
    return weights + batch * T * per_token * bytes_per


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits(need: int, what: str, device: Any = "cpu", available: Optional[int] = None) -> None:
    """Refuse (ResourceError, one line) when ``need`` bytes exceed the memory available for ``device``."""
    have = available if available is not None else available_bytes(device)
    if have is not None and need > have:
        where = "free on the GPU" if str(device).startswith("cuda") else "available on this machine"
        raise ResourceError(f"{what} needs at least {_fmt(need)} of memory but only {_fmt(have)} is {where}; "
                            f"choose a smaller model, batch or sequence length")


def check_model_fits(m, batch: int = 0, T: int = 0, training: bool = False, device: Any = "cpu",
                     what: Optional[str] = None) -> None:
    """``check_fits`` of ``gpt_memory``: call before building a model of ModelConfig ``m`` or a batch for it."""
    if str(device) == "meta":
        return
    label = what or (f"model {m.preset} (L{m.n_layer} d{m.n_embd} V{m.vocab_size}, "
                     f"{gpt_param_count(m):,} parameters)" + (f" with batch {batch}x{T}" if batch else ""))
    check_fits(gpt_memory(m, batch, T, training), label, device)


def spu_memory(m, T: int, sequences: int = 1) -> int:
    """An estimate of what a 2PC run of GPT ``m`` on ``T`` tokens holds in memory, per parameter: the plaintext
    model (4 bytes), its export read by the server (4), the weights as 64-bit ring elements in the server's SPU
    runtime (8) and the copy made while they are fed in (8), and the other party's 64-bit view of them, which the
    in-process simulator also holds (8); plus the activations and logits of the sequences as 64-bit values of
    both parties (16 bytes per value, twice for a product's operands). Not measured against SPU's peak: it is
    meant to refuse sizes that cannot run, up front, not to predict the peak."""
    d, V = m.n_embd, m.vocab_size
    h = m.ffn_hidden if m.ffn_hidden is not None else 4 * d
    acts = sequences * T * (4 * d + h + m.n_head * T + V)
    return gpt_param_count(m) * 32 + acts * 16 * 2
