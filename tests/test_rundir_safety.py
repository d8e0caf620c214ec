"""Nothing escapes a run, sweep or export directory, and partial outputs never stay behind.

A run directory received from someone else may hold symbolic links where privlm writes (`.lock`, `state/`,
`state/step-N`, `config_history.jsonl`, `metrics.jsonl`, `tb/`, a link to the run's own parent). Every case:
the command fails with one stderr line naming the link, and everything outside the directory is byte for
byte what it was. Also: export-hf and report leave no partial output on failure (and export-hf cleans what a
killed export left), files get the user's umask, permission problems are named as such, and a path with a
newline keeps the error on one line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from privlm.cli import main
from privlm.config import load_config
from privlm.errors import UnsafePathError
from privlm.fileio import RunDirectory, atomic_write_text
from privlm.train.loop import train
from small_corpus import stdlib_corpus_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves this file out

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    return stdlib_corpus_overrides(tmp_path_factory.mktemp("corpus"), 12)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config("SM+LN+G", corpus + ["train.batch_size=4", "train.eval_max_batches=2", "train.max_steps=4",
                                           "train.save_every=2", "train.eval_every=2", "train.log_every=1"]),
          run, quiet=True)
    return run


def fresh_run(trained: Path, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(trained, run)
    return run


def snapshot(root: Path) -> dict:
    """Every file's bytes and every directory and link under ``root`` (links not followed), with modes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode, p.read_bytes())
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_naming(code: int, err: str, path: Path) -> str:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and "symbolic link" in lines[0], lines[0]
    return lines[0]


def outside_world(tmp_path: Path, trained: Path) -> Path:
    """What a link may point at: a precious file, another run (with its checkpoints), an empty directory."""
    world = tmp_path / "outside"
    world.mkdir()
    (world / "precious.txt").write_bytes(b"precious data\n" * 100)
    shutil.copytree(trained, world / "other-run")
    (world / "empty").mkdir()
    return world


RESUME = ("train", "--resume")


# ---------------------------------------------------------------------------------------------------
# train --resume of a run directory holding links

@pytest.mark.parametrize("name,target", [
    (".lock", "precious.txt"),                    # flock + ftruncate would truncate the target
    ("config_history.jsonl", "precious.txt"),     # the resume's override record would be appended to it
    ("metrics.jsonl", "precious.txt"),            # metrics would be appended to it
    ("state", "other-run/state"),                 # pruning would delete the other run's checkpoints
    ("tb", "empty"),                              # TensorBoard events would be written there
])
def test_resume_refuses_links_and_leaves_the_outside_untouched(tmp_path, trained, capsys, name, target):
    world = outside_world(tmp_path, trained)
    run = fresh_run(trained, tmp_path)
    link = run / name
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(world / target)
    before_world, before_run = snapshot(world), snapshot(run)
    code, _, err = run_cli(capsys, *RESUME, run, "train.max_steps=6", "train.lr=1e-3", "--quiet")
    one_line_naming(code, err, link)
    assert snapshot(world) == before_world
    assert snapshot(run) == before_run  # refused before anything was written


def test_resume_refuses_a_linked_checkpoint_directory(tmp_path, trained, capsys):
    world = outside_world(tmp_path, trained)
    run = fresh_run(trained, tmp_path)
    steps = sorted((run / "state").glob("step-*"))
    # the latest checkpoint stays real (the resume loads it); an older one is a link to another run's
    victim = world / "other-run" / "state" / steps[-1].name
    link = run / "state" / "step-00000001"
    link.symlink_to(victim, target_is_directory=True)
    before = snapshot(world)
    code, _, err = run_cli(capsys, *RESUME, run, "train.max_steps=6", "--quiet")
    one_line_naming(code, err, link)
    assert snapshot(world) == before and victim.is_dir()


def test_resume_refuses_a_link_to_the_runs_own_parent(tmp_path, trained, capsys):
    """`state -> ..`: leftover removal (.*.tmp) and pruning (step-*) would act on the run's parent."""
    run = fresh_run(trained, tmp_path)
    (tmp_path / ".precious.tmp").write_text("a file of the user's, named like a leftover\n")
    (tmp_path / "step-00000009").mkdir()  # and a directory named like a checkpoint
    (tmp_path / "step-00000009" / "keep.txt").write_text("mine\n")
    shutil.rmtree(run / "state")
    (run / "state").symlink_to("..", target_is_directory=True)
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run/")}
    code, _, err = run_cli(capsys, *RESUME, run, "train.max_steps=6", "--quiet")
    one_line_naming(code, err, run / "state")
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run/")} == before


def test_new_run_into_a_directory_with_a_planted_lock_link(tmp_path, corpus, capsys):
    world = tmp_path / "outside"
    world.mkdir()
    (world / "precious.txt").write_bytes(b"x" * 1000)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(world / "precious.txt")
    code, _, err = run_cli(capsys, "train", "SM+LN+G", *corpus, "train.max_steps=2", "--out", run, "--quiet")
    one_line_naming(code, err, run / ".lock")
    assert (world / "precious.txt").read_bytes() == b"x" * 1000


# ---------------------------------------------------------------------------------------------------
# the primitives

def test_run_directory_primitives(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    rd = RunDirectory(root)
    for bad in ("../outside.txt", "/etc/passwd", "a/../../outside.txt"):
        with pytest.raises(UnsafePathError):
            rd.path(bad)
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    for call in (lambda: rd.open_append("link"), lambda: rd.open_lock("link"), lambda: rd.write_text("link", "x"),
                 lambda: rd.write_text("dirlink/outside.txt", "x"), lambda: rd.remove("dirlink"),
                 lambda: rd.remove("dirlink/outside.txt"), lambda: rd.mkdir("dirlink/new"),
                 lambda: rd.entries("dirlink"), lambda: atomic_write_text(root / "link", "x")):
        with pytest.raises(UnsafePathError):
            call()
    with pytest.raises(UnsafePathError, match="symbolic link"):
        rd.check_tree()
    os.link(outside, root / "hard")  # a hard link to an outside file: appending would modify it
    with pytest.raises(UnsafePathError, match="hard links"):
        rd.open_append("hard")
    assert outside.read_text() == "keep\n" and not (tmp_path / "new").exists()
    # what is inside works, with the user's umask
    with rd.open_append("log.jsonl") as fh:
        fh.write("a\n")
    rd.write_text("sub/x.txt", "y")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(root / "sub" / "x.txt").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(root / "log.jsonl").st_mode) == 0o666 & ~umask
    rd.remove("sub")
    assert not (root / "sub").exists() and (root / "log.jsonl").read_text() == "a\n"


def test_run_files_get_the_users_umask(trained):
    umask = os.umask(0)
    os.umask(umask)
    files = [trained / "model.safetensors", *(trained / "state").rglob("*.safetensors"), trained / "summary.json"]
    dirs = [trained / "state", *(trained / "state").glob("step-*")]
    assert len(files) >= 3 and len(dirs) >= 2
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask, f
    for d in dirs:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~umask, d


# ---------------------------------------------------------------------------------------------------
# sweep

def _sweep_file(tmp_path: Path, corpus: list[str]) -> Path:
    f = tmp_path / "sweep.yaml"
    f.write_text(json.dumps({"name": "t", "overrides": corpus + ["train.max_steps=2", "train.batch_size=4"],
                             "runs": ["SM+LN+G"]}))
    return f


def test_sweep_out_an_existing_run_directory_is_refused(tmp_path, trained, corpus, capsys):
    run = fresh_run(trained, tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(capsys, "sweep", _sweep_file(tmp_path, corpus), "--out", run)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and f"'{run}' is a run directory" in lines[0], err
    assert snapshot(run) == before


def test_sweep_directory_with_a_link_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "logs").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    code, _, err = run_cli(capsys, "sweep", _sweep_file(tmp_path, corpus), "--out", out)
    one_line_naming(code, err, out / "logs")
    assert list((tmp_path / "elsewhere").iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["logs"]


# ---------------------------------------------------------------------------------------------------
# report: no partial file, no write through a link

def test_report_output_link_is_refused(tmp_path, trained, capsys):
    target = tmp_path / "precious.html"
    target.write_text("mine\n")
    link = tmp_path / "report.html"
    link.symlink_to(target)
    code, _, err = run_cli(capsys, "report", trained, "-o", link)
    one_line_naming(code, err, link)
    assert target.read_text() == "mine\n" and link.is_symlink()


def test_report_on_a_full_disk_leaves_no_partial_file(tmp_path, trained, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "old.html").write_text("the previous report\n")
        code, _, err = run_cli(capsys, "report", trained, "-o", disk / "old.html")  # embeds PNGs: > 64 KiB
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and "No space left on device" in lines[0], err
        assert sorted(p.name for p in disk.iterdir()) == ["old.html"]  # no partial temp file
        assert (disk / "old.html").read_text() == "the previous report\n"  # the old report is intact
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------------------------------------------
# export-hf: removed on failure, cleaned after a kill, umask

def test_export_hf_full_disk_removes_its_partial_output(tmp_path, trained, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out"))
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
    code, _, err = run_cli(capsys, "export-hf", trained, tmp_path / "out")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the export nor its temporary directory


def test_export_hf_killed_mid_write_is_cleaned_by_the_next_export(tmp_path, trained, capsys):
    parent = tmp_path / "exports"
    parent.mkdir()
    # a killed export: SIGKILL while the tokenizer is being written (weights already in the temp directory)
    script = ("import os, signal, sys\n"
              "from transformers import PreTrainedTokenizerFast\n"
              "PreTrainedTokenizerFast.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from privlm.hfexport import export_hf\n"
              "export_hf(sys.argv[1], sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", script, str(trained), str(parent / "a")], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = [p for p in parent.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".a.privlm-export-") and (left[0] / "model.safetensors").is_file()
    # user files with similar names, a link with privlm's name, and a live export's directory must stay
    (parent / ".notes.tmp").mkdir()
    (parent / ".notes.tmp" / "x").write_text("mine\n")
    (parent / "b.privlm-export-1.tmp").write_text("no leading dot: not privlm's\n")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep\n")
    (parent / ".c.privlm-export-link.tmp").symlink_to(victim, target_is_directory=True)
    from privlm.hfexport import _lock_dir
    live = parent / ".d.privlm-export-live.tmp"
    live.mkdir()
    fd = _lock_dir(live)
    try:
        code, _, err = run_cli(capsys, "export-hf", trained, parent / "b")
    finally:
        os.close(fd)
    assert code == 0, err
    assert sorted(p.name for p in parent.iterdir()) == sorted([".notes.tmp", "b.privlm-export-1.tmp", "b",
                                                              ".c.privlm-export-link.tmp", live.name])
    assert (victim / "keep").read_text() == "keep\n" and (parent / ".notes.tmp" / "x").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(parent / "b").st_mode) == 0o777 & ~umask
    for f in (parent / "b").iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask, f


def test_export_hf_into_a_link_is_refused(tmp_path, trained, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "empty", target_is_directory=True)
    code, _, err = run_cli(capsys, "export-hf", trained, tmp_path / "out")
    one_line_naming(code, err, tmp_path / "out")
    assert list((tmp_path / "empty").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# one line, whatever the path; permission problems named as such

def test_a_newline_in_a_path_keeps_the_error_on_one_line(tmp_path, capsys):
    bad = tmp_path / "evil\nprivlm eval: ok"
    code, _, err = run_cli(capsys, "eval", bad)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "evil\\nprivlm eval: ok" in lines[0], err
    code, _, err = run_cli(capsys, "train", "SM+LN+G", "train.max_steps=1", "--resume", bad)
    assert code != 0 and len(err.strip().splitlines()) == 1, err


def test_an_unreadable_run_is_permission_denied_not_missing(trained, capsys, monkeypatch):
    """A colleague's run they cannot read: the error says so (as root: with the effective user nobody)."""
    base = Path(tempfile.mkdtemp(prefix="privlm-perm-"))
    monkeypatch.setenv("PRIVLM_HOME", str(base / "home"))  # the session's home is root's
    try:
        os.chmod(base, 0o755)
        run = base / "run"
        shutil.copytree(trained, run)
        code, _, err = run_cli(capsys, "eval", run, "--max-batches", "1")  # readable: works (and warms imports)
        assert code == 0, err
        os.chmod(run, 0o700 if os.geteuid() == 0 else 0o000)
        if os.geteuid() == 0:
            os.setegid(65534)
            os.seteuid(65534)
        try:
            code, _, err = run_cli(capsys, "eval", run, "--max-batches", "1")
        finally:
            if os.geteuid() != os.getuid():
                os.seteuid(0)
                os.setegid(0)
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1, err
        assert "Permission denied" in lines[0] and str(run) in lines[0], lines[0]
        assert "No such file" not in lines[0] and "does not exist" not in lines[0]
    finally:
        if (base / "run").exists():
            os.chmod(base / "run", 0o755)
        shutil.rmtree(base, ignore_errors=True)
