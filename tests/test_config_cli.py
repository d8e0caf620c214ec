"""Typed configuration and `privlm inspect`: presets resolve, bad input fails early with one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from privlm.cli import main
from privlm.config import ConfigError, load_config, to_yaml, from_dict
from privlm.presets import PAPER_PRESETS, normalize_name, preset_fields


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("written,canonical", [
    ("SM + LN + G", "SM+LN+G"), ("sm(t) + scfuffn", "SM(t)+ScFuFFN"), ("SM+WN(QK+FFN)", "SM+WN(qk+ffn)"),
    ("ereg( sm(t)+ScFuFFN )", "EReg(SM(t)+ScFuFFN)"),
])
def test_preset_names_ignore_case_and_spaces(written, canonical):
    assert preset_fields(written) == preset_fields(canonical)
    assert normalize_name(written) == normalize_name(canonical)


def test_preset_fields_are_what_the_names_say():
    base, _ = preset_fields("SM+LN+G")
    assert (base["norm"], base["activation"], base["ffn"], base["ln_f"]) == ("layernorm", "gelu", "standard", True)
    sm, _ = preset_fields("SM")
    assert (sm["norm"], sm["activation"], sm["ln_f"]) == ("none", "identity", False)
    fu, _ = preset_fields("SM(t)+ScFuFFN^i6")
    assert fu["ffn"] == "fused" and fu["ffn_scaling"] and fu["attn_temperature"] and fu["ffn_prune_deepest"] == 6
    sn, _ = preset_fields("SM+SN(qkvo+ffn)")
    assert sn["spectral_norm"] == "qkvo+ffn" and sn["weight_norm"] == "none"
    _, extra = preset_fields("EReg(SM(t)+ScFuFFN)")
    assert extra == {"reg": {"enabled": True}}
    lr, _ = preset_fields("SM+LR(0.1)")
    assert lr["activation"] == "leaky_relu" and lr["leaky_slope"] == 0.1


def test_config_resolution_order(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  preset: SM+R\n  n_layer: 3\ntrain:\n  lr: 0.002\n")
    cfg = load_config(str(yaml_file), ["train.lr=0.005", "model.n_embd=64", "model.n_head=4"])
    assert cfg.model.preset == "SM+R" and cfg.model.activation == "relu" and cfg.model.norm == "none"
    assert cfg.model.n_layer == 3 and cfg.model.n_embd == 64 and cfg.train.lr == 0.005
    # a preset field can still be overridden explicitly
    cfg = load_config("SM+R", ["model.ln_f=true"])
    assert cfg.model.ln_f is True
    # and the saved form round-trips without re-applying the preset
    import yaml
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_every_paper_preset_resolves():
    for name in PAPER_PRESETS:
        assert load_config(name).model.preset == name


BAD_INPUTS = [
    (["inspect", "SM+XYZ"], "unknown preset 'SM+XYZ'"),
    (["inspect", "LN+G"], "must start with SM"),
    (["inspect", "SM+WN(v)"], "placement 'v'"),
    (["inspect", "SM", "model.n_layers=3"], "unknown config key 'model.n_layers'"),
    (["inspect", "SM", "optim.lr=3"], "unknown config key 'optim'"),
    (["inspect", "SM", "model.n_layer=three"], "model.n_layer"),
    (["inspect", "SM", "model.n_embd=100", "model.n_head=12"], "not divisible by model.n_head=12"),
    (["inspect", "SM", "data.seq_len=2048", "model.block_size=1024"], "larger than the position table"),
    (["inspect", "SM+ScFuFFN", "model.temperature_init=0.1"], "has no attention temperature"),
    (["inspect", "SM", "model.activation=swish"], "model.activation='swish' is not allowed; choose one of"),
    (["inspect", "SM+ScFuFFN", "model.activation=gelu"], "needs model.activation=identity"),
    (["inspect", "SM+ScFuFFN^i13"], "ffn_prune_deepest=13"),
    (["inspect", "SM", "model.n_layer"], "not of the form section.key=value"),
    (["inspect", "missing.yaml"], "does not exist"),
    (["inspect", "SM", "model.weight_norm=ffn", "model.spectral_norm=qk"], "choose one"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_gives_one_line_error(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("privlm inspect: error:")


def test_bad_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    code, _, err = run_cli(capsys, "inspect", str(bad))
    assert code != 0 and "not valid YAML" in err and len(err.strip().splitlines()) == 1
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    code, _, err = run_cli(capsys, "inspect", str(section))
    assert code != 0 and "'model' is a section" in err


@pytest.mark.slow
def test_inspect_shows_temperature_and_scales_at_gpt2_size(capsys):
    code, out, _ = run_cli(capsys, "inspect", "SM(t)+ScFuFFN", "model.n_layer=12", "model.n_embd=768",
                           "model.n_head=12")
    assert code == 0
    assert "blocks.11.attn.temperature" in out and "shape=[12, 1024]" in out
    assert "blocks.0.alpha" in out and "blocks.0.beta" in out
    assert "temperature_param: offset" in out


@pytest.mark.slow  # builds GPT-2 small's weights: seconds of CPU
def test_inspect_json_counts_gpt2_small_parameters(capsys):
    code, out, _ = run_cli(capsys, "inspect", "SM+LN+G", "--json")
    rep = json.loads(out)
    assert rep["parameters"]["total"] == 124_439_808  # GPT-2 small, tied head
    assert rep["config"]["model"]["activation"] == "gelu"
    # fused FFN: 12 x (d*d + d) instead of 12 x (8 d^2 + 5d)
    code, out, _ = run_cli(capsys, "inspect", "SM+ScFuFFN", "--json")
    fused = json.loads(out)["parameters"]["total"]
    d = 768
    no_ln = 124_439_808 - (2 * 12 + 1) * 2 * d
    assert fused == no_ln - 12 * (8 * d * d + 5 * d) + 12 * (d * d + d) + 2 * 12


@pytest.mark.slow
def test_console_script_exit_code():
    """The installed entry point, as a user runs it."""
    res = subprocess.run([sys.executable, "-m", "privlm.cli", "inspect", "SM", "model.n_head=7"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "not divisible" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_config_error_is_value_error():
    with pytest.raises(ConfigError):
        load_config("SM", ["train.lr=-1"])
