"""privlm.validate against independent references: parameter counts of the built models, headers of files the
safetensors library wrote, the shipped config and sweep files, hand-made schema cases."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from privlm.config import load_config
from privlm.errors import CheckpointError, ConfigError, ResourceError
from privlm.model import GPT
from privlm.presets import PAPER_PRESETS
from privlm.validate import (MATRIX, NUMBER, Opt, check_fits, check_schema, check_token_ids, check_yaml,
                             gpt_memory, gpt_param_count, read_jsonl, safetensors_header)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = ["model.n_layer=3", "model.n_embd=48", "model.n_head=4", "model.vocab_size=300", "model.block_size=32",
         "data.seq_len=32"]


@pytest.mark.parametrize("name", PAPER_PRESETS)
@pytest.mark.parametrize("extra", [[], ["model.bias=false", "model.tie_embeddings=false"]])
def test_param_estimate_is_a_close_lower_bound_of_the_built_model(name, extra):
    over = SMALL + extra + (["model.n_layer=8"] if "^i" in name else [])
    cfg = load_config(name, over)
    with torch.device("meta"):
        built = GPT(cfg.model).num_params()
    est = gpt_param_count(cfg.model)
    # never above the real count (the estimate refuses only what cannot fit); only per-layer scale vectors
    # (Eq. 8's alpha/beta, weight-norm gains, leaky slopes) are left out
    assert est <= built and built - est <= 0.03 * built, (built, est)


def test_memory_estimate_counts_optimizer_state_and_batch():
    m = load_config("SM+LN+G", SMALL).model
    p = gpt_param_count(m)
    assert gpt_memory(m) == 4 * p
    assert gpt_memory(m, training=True) == 16 * p  # weights, gradients, AdamW's two moments
    assert gpt_memory(m, batch=2, T=8) - gpt_memory(m) == 2 * 8 * (4 * 48 + 4 * 48 + 2 * 300) * 4
    with pytest.raises(ResourceError, match="needs at least 1.5 KiB of memory but only 1000 B"):
        check_fits(1536, "x", available=1000)
    check_fits(1000, "x", available=1000)


def test_safetensors_header_agrees_with_the_library(tmp_path):
    f = tmp_path / "t.safetensors"
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.float16), "c": torch.arange(4),
               "d": torch.zeros(0, 2), "e": torch.ones(2, 2, dtype=torch.bfloat16), "f": torch.tensor(True)}
    save_file(tensors, str(f), metadata={"k": "v"})
    header = safetensors_header(f)
    with safe_open(str(f), "pt") as fh:
        assert header["__metadata__"] == fh.metadata()
        assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == \
            {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    data = f.read_bytes()
    f.write_bytes(data[:-1])  # one byte short: the last tensor's range leaves the file
    with pytest.raises(CheckpointError, match="outside the file's"):
        safetensors_header(f)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_passes_the_bounds(path):
    assert check_yaml(path) == path.read_text()


def test_alias_bomb_is_refused_without_expanding_it(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 12)))  # 10^12 values
    with pytest.raises(ConfigError, match="expands to more than 200,000 values"):  # sizes memoized per node:
        check_yaml(f)  # the work is proportional to the file, never to the 10^12 values
    f.write_text("a: &a [1, 2]\nb: [*a, *a, *a]\n")  # aliases that stay small are fine
    check_yaml(f)


@pytest.mark.parametrize("value, spec, problem", [
    ({"a": 1}, {"a": int}, None),
    ({"a": True}, {"a": int}, "'a' must be an integer (got a boolean)"),
    ({"a": 1.5}, {"a": NUMBER}, None),
    ({}, {"a?": int}, None),
    ({}, {"a": int}, "lacks the field 'a'"),
    ({"a": None}, {"a": Opt(int)}, None),
    ({"a": [[1, None], [2, 3]]}, {"a": MATRIX}, None),
    ({"a": [[1, 2], [3]]}, {"a": MATRIX}, "'a' must be a rectangular list of lists of numbers (got a list)"),
    ({"r": [{"s": 1}, {"s": "2"}]}, {"r": [{"s": int}]}, "'r[1].s' must be an integer (got a string)"),
    ([], {}, "must be a mapping (got a list)"),
])
def test_schema_names_the_field(value, spec, problem):
    assert check_schema(value, spec) == problem


def test_jsonl_torn_tail_is_only_the_unterminated_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2, "loss": {"a"')
    assert read_jsonl(f) == [{"kind": "train", "step": 1}]
    f.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st}\n')  # terminated: a corrupt record
    with pytest.raises(CheckpointError, match="line 2 is not valid JSON"):
        read_jsonl(f)


def test_token_ids_against_the_vocabulary():
    check_token_ids([0, 5, 9], 10, "x")
    with pytest.raises(Exception, match="token id 10, outside the model's vocabulary 0..9"):
        check_token_ids([0, 10], 10, "x")
    with pytest.raises(Exception, match="token id -1"):
        check_token_ids([-1, 3], 10, "x")
