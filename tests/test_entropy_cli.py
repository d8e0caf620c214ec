"""`privlm entropy RUN_DIR`: a hand-built run directory, measured and compared with a direct forward."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file, save_model

from privlm.cli import main
from privlm.config import load_config, to_dict
from privlm.data import prepare_data
from privlm.entropy.cli import entropy_report, format_report
from privlm.model.gpt import GPT

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\n        self.y = y\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("entropy_cli")
    for split in ("train", "valid"):
        (root / split).mkdir()
        for i in range(3):
            (root / split / f"f{i}.py").write_text((TEXT.replace("add", f"{split}{i}") + f"# file {i}\n") * 20)
    run = root / "run"
    run.mkdir()
    src = f"files:{root / 'valid'}/*.py"
    cfg = load_config("SM(t)+ScFuFFN", ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "data.seq_len=32",
                                        "model.block_size=32", "data.vocab_size=300", f"data.source=files:{root / 'train'}/*.py",
                                        f"data.valid_source={src}", f"data.cache_dir={root / 'cache'}", "reg.enabled=true",
                                        "train.batch_size=4"])
    data = prepare_data(cfg.data, run)
    cfg.model.vocab_size = data.vocab_size
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_model(model, str(run / "model.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    theta = torch.tensor([[0.1, 0.5, 0.7, 0.9], [0.3, 0.4, 0.5, 0.6]])
    save_file({"theta": theta}, str(run / "entropy_reg.safetensors"))
    return run, src, model, theta


def test_report_matches_direct_measurement(run_dir):
    run, src, model, theta = run_dir
    rep = entropy_report(str(run), data_source=src, max_batches=2, device="cpu")
    chunks = prepare_data(load_config("SM(t)+ScFuFFN", [f"data.source=files:{run.parent / 'train'}/*.py",
                                                        f"data.valid_source={src}",
                                                        f"data.tokenizer={run / 'tokenizer.json'}",
                                                        "data.seq_len=32", "data.max_valid_docs=null",
                                                        f"data.cache_dir={run.parent / 'cache'}"]).data).valid[:8]
    ids = torch.from_numpy(np.asarray(chunks, dtype=np.int64))
    with torch.no_grad():
        ref = model.eval()(ids, output_entropy=True).entropy.double().mean(dim=(1, 3)).numpy()
    assert rep["sequences"] == 8 and rep["seq_len"] == 32
    np.testing.assert_allclose(np.array(rep["head_entropy"]), ref, rtol=1e-6)
    assert rep["causal_max"] == pytest.approx(sum(math.log(i) for i in range(1, 33)) / 32)
    assert sum(rep["bins"]["counts"]) == 8 and rep["collapse"]["nan_counts"] == [0.0, 0.0]
    dev = ref - theta.double().numpy() * math.log(32)
    assert rep["thresholds"]["outside_share"] == pytest.approx(np.mean(np.abs(dev) > 0.2 * math.log(32)))
    text = format_report(rep)
    assert "entropic overload:" in text and "entropy collapse:" in text and "learned thresholds" in text
    assert f"{ref[1, 3]:6.3f}" in text


def test_cli_json_and_errors(run_dir, capsys, tmp_path, monkeypatch):
    import privlm.cli
    monkeypatch.setattr(privlm.cli, "SUBCOMMAND_MODULES", {"entropy": "privlm.entropy.cli"})  # only ours
    run, src, _, _ = run_dir
    assert main(["entropy", str(run), "--data", src, "--max-batches", "1", "--device", "cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sequences"] == 4 and len(rep["head_entropy"]) == 2 and len(rep["head_entropy"][0]) == 4
    assert main(["entropy", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("privlm entropy: error:") and "does not exist" in err and err.count("\n") == 1
