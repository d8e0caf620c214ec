"""Every bad input of every command ends with one line on stderr naming the problem, a non-zero exit, no
traceback and no file lost or changed.

Each case runs through the real `privlm` entry function (`privlm.cli.main`) in this process (fast: one set of
imports for all cases); `test_bad_inputs_in_a_real_subprocess` runs a sample of them as separate processes
through the console script. docs/bad-inputs.md is the table of these cases: regenerate it with
``PRIVLM_WRITE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py`` (a test checks it lists every case).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

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
         r"cannot load '.*model\.safetensors'", setup=_write("model.safetensors", b"not safetensors")),
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
         ["sample", "{run}", "--prompt", "x", "--temperature", "-1"], r"--temperature=-1\.0 must be a finite number >= 0"),
    Case("sample-non-utf8", "sample", "a prompt that is not UTF-8 (byte 0xff)",
         ["sample", "{run}", "--prompt", "a\udcffb"], r"--prompt is not valid UTF-8"),
    Case("sample-top-k-zero", "sample", "--top-k 0", ["sample", "{run}", "--prompt", "x", "--top-k", "0"],
         r"--top-k=0 must be positive"),
    Case("sample-no-prompt", "sample", "no --prompt", ["sample", "{run}"],
         r"the following arguments are required: --prompt"),
    Case("sample-empty-prompt", "sample", "an empty prompt", ["sample", "{run}", "--prompt", ""],
         r"--prompt is empty after tokenization"),
    Case("sample-tokens-word", "sample", "--max-new-tokens that is not a number",
         ["sample", "{run}", "--prompt", "x", "--max-new-tokens", "many"], r"invalid int value: 'many'"),
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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
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
    groups = {c.command for c in CASES}
    assert {"train", "resume", "eval", "sample", "entropy", "cost", "report", "sweep", "data", "pi"} <= groups
    assert len({c.id for c in CASES}) == len(CASES) >= 40


def test_docs_table_lists_every_case():
    text = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/bad-inputs.md lacks {missing}; regenerate it (see this module's docstring)"
    assert f"{len(CASES)} cases" in text


SUBPROCESS_SAMPLE = ["train-lr-inf", "resume-malformed-rng", "eval-missing-run", "sample-non-utf8",
                     "cost-nan-override", "data-bad-jsonl", "sweep-missing-file"]


@pytest.mark.parametrize("case_id", SUBPROCESS_SAMPLE)
def test_bad_inputs_in_a_real_subprocess(case_id, ctx, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
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
    if os.environ.get("PRIVLM_WRITE_BAD_INPUTS_DOC") != "1" or len(RESULTS) != len(CASES):
        return
    out = ["# Bad inputs and what privlm says", "",
           "Every row is a case of `tests/test_bad_inputs.py`, which runs it through the `privlm` command and checks "
           "a non-zero exit, exactly one line on stderr naming the problem, no Python traceback, and that no "
           "existing file was removed or changed. `RUN` is a small trained run directory, `TMP` a scratch "
           "directory. Regenerate with `PRIVLM_WRITE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py`.", ""]
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    for group in dict.fromkeys(c.command for c in CASES):
        out += [f"## {group}", "", "| case | bad input | command | message (stderr) |", "|---|---|---|---|"]
        for c in CASES:
            if c.command == group:
                case, cmd, msg = RESULTS[c.id]
                env = " ".join(f"{k}=…" for k in (case.env or {}))
                out.append(f"| `{c.id}` | {cell(c.what)} | `{cell((env + ' ' if env else '') + 'privlm ' + cmd)}` "
                           f"| {cell(msg)} |")
        out.append("")
    out += [f"{len(CASES)} cases over {len({c.command for c in CASES})} commands; none prints a traceback, each "
            f"prints exactly one line and exits non-zero, and none removes or changes an existing file.", ""]
    DOC.write_text("\n".join(out))
