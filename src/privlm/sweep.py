"""`privlm sweep SWEEP.yaml [--out DIR] [--max-runs N] [--jobs N] [--list]`: train a list of presets or a config
grid with the same data, token budget and seed, resume where an interrupted sweep stopped, and write
results.md / results.json (the layout of the paper's Table 3) and report.html.

A sweep file::

    name: cpu-study
    config: ../cpu/study.yaml        # base config: YAML path (relative to this file) or preset; optional
    overrides: [train.max_steps=300] # applied to every run (after `config`)
    baseline: SM+LN+G                # run the savings columns are relative to (default: the first)
    runs:                            # presets, or mappings {preset, name, overrides}
      - SM+LN+G
      - {preset: "EReg(SM(t)+ScFuFFN)", name: ereg-g0.1, overrides: [reg.gamma=0.1]}
    grid:                            # optional cartesian product, applied to every entry of `runs`
      reg.gamma: [0.0, 0.05, 0.10]
    select: {among: "EReg(SM(t)+ScFuFFN)", keys: [reg.lambda_, reg.gamma]}  # optional: choose on the held-out
                                     # split, write selection.json beside results.json (privlm.selection)
    overrides_from: ../../docs/results/x/selection.json  # optional: a selection's key=values, after `overrides`

Every run gets the same `data.*`, `train.max_steps`/batch (hence token budget) and `train.seed` unless an
entry overrides them on purpose. Each run lives in DIR/<name>; a finished run (summary.json) is skipped,
a run with a checkpoint is resumed exactly (`privlm train --resume` semantics), a run directory without
any checkpoint is moved aside to <name>.incomplete-<time> and started again (nothing is deleted).
`--jobs N` trains N runs at once, each in its own process with one torch thread (or --threads), console
output in DIR/logs/<name>.log; Ctrl-C stops them all and the same command resumes them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from privlm.config import Config, ConfigError, load_config, looks_like_config_file, to_dict
from privlm.errors import MAX_COUNT, CheckpointError, DivergenceError, bounded_int
from privlm.fileio import RunDirectory, atomic_write_text, slug
from privlm.launchers import slurm as slurm_launcher
from privlm.launchers.slurm import SlurmResources, parse_resources
from privlm.results import RunRow
from privlm.selection import parse_select, selection_overrides
from privlm.validate import check_intervals, read_json, read_yaml

SWEEP_KEYS = {"name", "config", "overrides", "baseline", "runs", "grid", "description", "title", "slurm", "select",
              "overrides_from"}
ENTRY_KEYS = {"preset", "name", "overrides"}
# Keys resolved from the data when a run starts, so its config.yaml differs from the sweep's config there (the
# vocabulary follows the tokenizer).
_SET_BY_TRAINER = {("model", "vocab_size")}


@dataclass
class SweepRun:
    name: str
    preset: str
    overrides: list[str]
    cfg: Config


@dataclass
class Sweep:
    name: str
    path: Path
    runs: list[SweepRun]
    baseline: Optional[str]
    description: str = ""
    common: list[str] = field(default_factory=list)
    slurm: SlurmResources = field(default_factory=SlurmResources)  # per-run resources for --launcher slurm
    select: Optional[dict] = None  # a selection sweep's `select` (privlm.selection): writes selection.json


def _flatten(raw: dict, prefix: str = "") -> list[str]:
    """{'model': {'n_layer': 4}} -> ['model.n_layer=4'] (values as JSON, which YAML parses back)."""
    out = []
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, dotted + ".")
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out


def _as_list(value: Any, what: str, origin: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{origin}: '{what}' must be a list of key=value strings")
    return list(value)


MAX_SWEEP_RUNS = 10_000


def load_sweep(path: str | Path) -> Sweep:
    """Parse and resolve a sweep file: every run's full config is built (and validated) up front, so a
    typo in the 11th entry fails before the first run starts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    raw = read_yaml(path, ConfigError, "sweep file")  # size, nesting and alias expansion bounded
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file '{path}' must be a mapping with at least 'runs' or 'grid'")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"sweep file '{path}': unknown key(s) {sorted(unknown)}; known: {sorted(SWEEP_KEYS)}")
    origin = f"sweep file '{path}'"
    base_spec = raw.get("config")
    common = _as_list(raw.get("overrides"), "overrides", origin)
    if isinstance(base_spec, dict):  # an inline base config
        common = _flatten(base_spec) + common
        base_spec = None
    elif isinstance(base_spec, str) and looks_like_config_file(base_spec):
        candidate = (path.parent / base_spec)
        base_spec = str(candidate if candidate.is_file() else Path(base_spec))
    elif base_spec is not None and not isinstance(base_spec, str):
        raise ConfigError(f"{origin}: 'config' must be a YAML path, a preset name or a mapping")

    from_file = raw.get("overrides_from")
    if from_file is not None:  # values chosen by a selection sweep (privlm.selection), after the own overrides
        if not isinstance(from_file, str):
            raise ConfigError(f"{origin}: 'overrides_from' must be the path of a selection.json")
        common = common + selection_overrides(path.parent / from_file, origin)
    select = parse_select(raw.get("select"), origin)

    entries = raw.get("runs") or [None]
    if not isinstance(entries, list):
        raise ConfigError(f"{origin}: 'runs' must be a list of presets or {{preset, name, overrides}} mappings")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{origin}: 'grid' must map dotted keys to non-empty lists of values")
    if raw.get("runs") is None and not grid:
        raise ConfigError(f"{origin}: give 'runs' (a list of presets) and/or 'grid'")
    n_runs = len(entries) * math.prod(len(v) for v in grid.values())
    if n_runs > MAX_SWEEP_RUNS:  # every run's config is resolved up front: bound the work before starting it
        raise ConfigError(f"{origin}: {n_runs:,} runs ('runs' x 'grid'), more than the {MAX_SWEEP_RUNS:,} a sweep "
                          f"may have; split it into several sweeps")

    runs: list[SweepRun] = []
    for i, entry in enumerate(entries):
        if entry is None:
            entry = {}
        elif isinstance(entry, str):
            entry = {"preset": entry}
        elif not isinstance(entry, dict) or set(entry) - ENTRY_KEYS:
            raise ConfigError(f"{origin}: runs[{i}] must be a preset name or a mapping with keys "
                              f"{sorted(ENTRY_KEYS)}")
        own = _as_list(entry.get("overrides"), f"runs[{i}].overrides", origin)
        preset = entry.get("preset")
        for combo in itertools.product(*grid.values()) if grid else [()]:
            grid_over = [f"{k}={json.dumps(v)}" for k, v in zip(grid, combo)]
            overrides = common + ([f"model.preset={preset}"] if preset else []) + own + grid_over
            try:
                cfg = load_config(base_spec, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: runs[{i}] ({preset or 'base'}): {exc}") from None
            name = entry.get("name") or cfg.model.preset
            if combo:
                name += "-" + "-".join(f"{k.split('.')[-1]}={v}" for k, v in zip(grid, combo))
            runs.append(SweepRun(slug(name), cfg.model.preset, own + grid_over, cfg))
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise ConfigError(f"{origin}: several runs would share the directory name(s) {dup}; give them "
                          f"distinct 'name's")
    baseline = raw.get("baseline")
    if baseline is not None:
        names = {r.name for r in runs} | {r.preset for r in runs}
        if baseline not in names and slug(baseline) not in names:
            raise ConfigError(f"{origin}: baseline '{baseline}' is not one of the runs ({', '.join(r.name for r in runs)})")
    return Sweep(name=str(raw.get("name") or path.stem), path=path, runs=runs, baseline=baseline,
                 description=str(raw.get("description") or ""), common=common,
                 slurm=parse_resources(raw.get("slurm"), origin), select=select)


# ----------------------------------------------------------------------------------------
def _config_differences(expected: Config, saved: Config) -> list[str]:
    a, b = to_dict(expected), to_dict(saved)
    diffs = []
    for section in a:
        for key in a[section]:
            if (section, key) in _SET_BY_TRAINER:
                continue
            if a[section][key] != b[section].get(key):
                diffs.append(f"{section}.{key}: sweep {a[section][key]!r} vs run {b[section].get(key)!r}")
    return diffs


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_sweep_dir(out: Path) -> None:
    """A sweep directory is not a run directory (it would write its runs and results into that run) and holds
    no symbolic link (a link could make a run or a log write outside it) outside submitit's job folder
    `slurm/` (not itself a link; privlm writes only new manifest files there); one line otherwise."""
    if (out / "config.yaml").is_file():
        raise CheckpointError(f"--out '{out}' is a run directory (it holds config.yaml), not a sweep directory; "
                              f"choose another --out")
    RunDirectory(out).check_tree(foreign=("slurm",))  # slurm/: submitit's job folder (its own links)


def run_sweep(sweep: Sweep, out: Path, max_runs: Optional[int] = None, quiet: bool = False,
              log=print, command: Optional[str] = None, jobs: int = 1, threads: Optional[int] = None,
              launcher=None) -> dict:
    """Train every run not yet finished (at most ``max_runs`` of them in this call), ``jobs`` at a time.
    Returns the state written to out/sweep.json. Divergence of one run is recorded and the sweep goes on.

    With ``jobs > 1`` every run trains in its own process with ``threads`` torch threads (default 1), its
    console output in out/logs/<name>.log; the run directories, resume and results are the same as with one
    job (each run's numbers do not depend on what runs beside it).

    ``launcher(sweep, out, todo, records, state, log)``, when given, trains the planned runs instead
    (`privlm.launchers.slurm`: a SLURM job array)."""
    from privlm.train.rundir import run_status
    from privlm.run import load_run_config  # torch: imported when a sweep runs, not when the CLI starts
    check_sweep_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep.json"
    state = read_json(state_file) if state_file.is_file() else {}
    state.update({"name": sweep.name, "sweep_file": str(sweep.path), "baseline": sweep.baseline})
    if command:
        state["command"] = command
    records = state.setdefault("runs", {})
    # Check every existing run directory before training anything: a sweep must never mix configs.
    for r in sweep.runs:
        run_dir = out / r.name
        if run_status(run_dir) in ("done", "resumable"):
            diffs = _config_differences(r.cfg, load_run_config(run_dir))
            if diffs:
                raise ConfigError(f"run directory '{run_dir}' holds a run with another config ({diffs[0]}"
                                  f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); use another "
                                  f"--out or move it away")
    todo: list[tuple[int, SweepRun, bool]] = []
    for i, r in enumerate(sweep.runs, 1):
        run_dir = out / r.name
        status = run_status(run_dir)
        rec = records.setdefault(r.name, {})
        rec.update({"preset": r.preset, "overrides": r.overrides, "dir": r.name})
        if status == "done":
            summary = read_json(run_dir / "summary.json")
            rec.update(status="diverged" if summary.get("diverged") else "done")
            log(f"[{i}/{len(sweep.runs)}] {r.name}: already finished, skipped")
            continue
        if max_runs is not None and len(todo) >= max_runs:
            log(f"stopping after {len(todo)} run(s) (--max-runs); rerun the same command to continue")
            break
        if status == "incomplete":
            from privlm.train.checkpoint import RunLock
            RunLock(run_dir).acquire().release()  # refuses (one line, with the pid) if another process trains it
            aside = run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            log(f"[{i}/{len(sweep.runs)}] {r.name}: no checkpoint to resume from; moved to {aside.name}")
            status = "new"
        todo.append((i, r, status == "resumable"))
    _write_json(state_file, state)
    if launcher is not None:
        launcher(sweep, out, todo, records, state, log)
    elif jobs > 1:
        _run_parallel(sweep, out, todo, records, state, jobs, threads or 1, log)
    else:
        _run_serial(sweep, out, todo, records, state, quiet, log)
    _write_json(state_file, state)
    return state


STARTED_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def training_intervals(rec: dict) -> list[list[float]]:
    """[start, end] (Unix seconds) of each stretch of training of a run's record in sweep.json. A record written
    before the intervals were kept holds only its last start and its seconds: read as one stretch [started,
    started + seconds], exact for a run trained in one go (`_start` converts it before a new stretch)."""
    if "intervals" in rec:
        return check_intervals(rec["intervals"], "sweep.json: a run's 'intervals'")
    if isinstance(rec.get("started"), str) and isinstance(rec.get("seconds"), (int, float)) and rec["seconds"]:
        import datetime
        try:
            t0 = datetime.datetime.strptime(rec["started"], STARTED_FORMAT).timestamp()
        except ValueError:  # not a start privlm wrote: no stretch to read from it
            return []
        return [[t0, round(t0 + rec["seconds"], 1)]]
    return []


def _start(rec: dict, state: dict, out: Path) -> float:
    rec["intervals"] = training_intervals(rec)
    rec.update(status="running", started=time.strftime(STARTED_FORMAT))
    _write_json(out / "sweep.json", state)
    return time.time()


def _finish(rec: dict, state: dict, out: Path, t0: float) -> None:
    now = time.time()
    rec["seconds"] = round(rec.get("seconds", 0.0) + now - t0, 1)
    rec.setdefault("intervals", []).append([round(t0, 1), round(now, 1)])
    _write_json(out / "sweep.json", state)


def _run_serial(sweep: Sweep, out: Path, todo: list, records: dict, state: dict, quiet: bool, log) -> None:
    from privlm.run import load_run_config
    from privlm.train.loop import train

    for i, r, resume in todo:
        run_dir, rec = out / r.name, records[r.name]
        log(f"[{i}/{len(sweep.runs)}] {r.name}: {'resuming' if resume else 'training'} {r.preset}")
        cfg = load_run_config(run_dir) if resume else r.cfg
        t0 = _start(rec, state, out)
        try:
            summary = train(cfg, run_dir, resume=resume, quiet=quiet)
            rec.update(status="done", final_ppl=summary.get("final_ppl"))
        except DivergenceError as exc:
            rec.update(status="diverged", diagnosis=str(exc))
            log(f"[{i}/{len(sweep.runs)}] {r.name}: diverged ({exc}); continuing with the next run")
        _finish(rec, state, out, t0)


def _train_in_child(cfg: Config, run_dir: str, resume: bool, threads: int, log_path: str, parent: int,
                    status_file: Optional[str] = None) -> None:
    """Entry point of a run's own process (spawned): dies with the sweep process ``parent`` (even a SIGKILLed
    one: the run lock goes with it, so the same command resumes the run), console output to its log file,
    ``threads`` torch threads, the exit status of `privlm train` (0 done, 3 diverged, 2 other one-line errors)."""
    import os
    import sys

    from privlm.proc import die_with_parent
    die_with_parent(parent)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch
    torch.set_num_threads(threads)
    from privlm.errors import PrivlmError
    from privlm.train.loop import train
    try:
        train(cfg, Path(run_dir), resume=resume, quiet=True,
              status_file=Path(status_file) if status_file else None)
    except PrivlmError as exc:
        print(f"privlm train: {exc}", flush=True)
        sys.exit(exc.exit_code)


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _run_parallel(sweep: Sweep, out: Path, todo: list, records: dict, state: dict, jobs: int, threads: int,
                  log) -> None:
    """At most ``jobs`` runs at once, each a spawned process; the parent only schedules and keeps sweep.json.
    A run's outcome is read from its run directory (summary.json) and exit status. On Ctrl-C the running
    processes are stopped; their last checkpoints stay, and the same command resumes them. A SIGKILLed sweep
    process takes its runs with it (`privlm.proc.die_with_parent`), so the same command resumes them too."""
    import contextlib
    import multiprocessing as mp
    import os

    from privlm.run import load_run_config

    ctx = mp.get_context("spawn")  # no fork of a process that already runs torch threads
    (out / "logs").mkdir(exist_ok=True)
    # Build each new run's tokenizer and token cache here, once, before any process starts: N processes
    # building the same cache at once would each do the whole tokenization.
    from privlm.data import prepare_data
    built: list = []
    for _, r, resume in todo:
        if not resume and r.cfg.data not in built:
            log(f"preparing data for {r.name} (shared by the runs with the same data config)")
            prepare_data(r.cfg.data, None)
            built.append(r.cfg.data)
    pending = list(todo)
    running: dict[str, tuple] = {}
    failures: list[str] = []
    from privlm.proc import interrupt_on_term

    from privlm.progress import ProgressBoard, status_path
    board = ProgressBoard()  # one live line per running run, on a terminal only
    term = contextlib.ExitStack()
    term.enter_context(interrupt_on_term())  # `kill PID` stops the runs like Ctrl-C, never orphans them
    term.callback(board.close)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, r, resume = pending.pop(0)
                run_dir = out / r.name
                cfg = load_run_config(run_dir) if resume else r.cfg
                log_path = out / "logs" / f"{r.name}.log"
                log(f"[{i}/{len(sweep.runs)}] {r.name}: {'resuming' if resume else 'training'} {r.preset} "
                    f"(log: {log_path})")
                status = status_path(out / "logs", r.name)
                with contextlib.suppress(FileNotFoundError):
                    status.unlink()  # a previous attempt's numbers are not this one's
                proc = ctx.Process(target=_train_in_child, name=f"privlm-sweep-{r.name}",
                                   args=(cfg, str(run_dir), resume, threads, str(log_path), os.getpid(),
                                         str(status)))
                t0 = _start(records[r.name], state, out)
                proc.start()
                running[r.name] = (i, r, proc, t0, log_path)
            time.sleep(0.2)
            for name, (i, r, proc, t0, log_path) in list(running.items()):
                if proc.is_alive():
                    board.update(name, status_path(out / "logs", name))
                    continue
                proc.join()
                board.remove(name)
                del running[name]
                rec = records[name]
                summary_file = out / name / "summary.json"
                summary = read_json(summary_file) if summary_file.is_file() else None
                if summary is not None and summary.get("diverged"):
                    rec.update(status="diverged", diagnosis=summary.get("diagnosis"))
                    log(f"[{i}/{len(sweep.runs)}] {name}: diverged ({summary.get('diagnosis')})")
                elif summary is not None and proc.exitcode == 0:
                    rec.update(status="done", final_ppl=summary.get("final_ppl"))
                    log(f"[{i}/{len(sweep.runs)}] {name}: done, PPL {summary.get('final_ppl'):.3f}")
                else:
                    why = _last_line(log_path) or f"exit status {proc.exitcode}"
                    rec.update(status="failed", error=why)
                    failures.append(f"{name}: {why}")
                    log(f"[{i}/{len(sweep.runs)}] {name}: failed ({why})")
                _finish(rec, state, out, t0)
    except KeyboardInterrupt:
        for name, (i, r, proc, t0, log_path) in running.items():
            proc.terminate()  # checkpoints are written atomically: the last complete one is what resumes
        for name, (i, r, proc, t0, log_path) in running.items():
            proc.join()
            records[name].update(status="interrupted")
            _finish(records[name], state, out, t0)
        raise
    finally:
        term.close()
    if failures:
        raise CheckpointError(f"{len(failures)} run(s) failed: {'; '.join(failures)}")


# ----------------------------------------------------------------------------------------
def _g(x: Optional[float]) -> str:
    return "–" if x is None else f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"


def _f(x: Any, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def results_markdown(sweep: Sweep, rows: list[RunRow], notes: list[str]) -> str:
    """Table 3 layout (PPL, #nonlinear ops, FFN/Attn FLOPs, Comm, Lat, savings) + entropy diagnostics."""
    lines = [f"# Sweep `{sweep.name}`", ""]
    if sweep.description:
        lines += [sweep.description.strip(), ""]
    base = next((r for r in rows if sweep.baseline in (r.name, r.preset)), rows[0] if rows else None)
    lines += [f"Baseline for the savings: **{base.preset if base else '–'}**. Comm/Lat: predicted 2PC cost "
              f"of one output token after a T-token prompt, profile `{next((r.cost.profile for r in rows if r.cost), '–')}`. "
              "Attn FLOPs in the paper's convention (8LTd² + 3LT²d)."]
    unigram = sorted({round(r.unigram_ppl, 3) for r in rows if r.unigram_ppl})
    if unigram:
        lines[-1] += (f" For scale: the unigram model of the same tokenizer has validation PPL "
                      f"{', '.join(f'{u:.1f}' for u in unigram)}.")
    lines.append("")
    lines += ["| Network Arch. | PPL | #Nonlinear Ops | FFN FLOPs | Attn FLOPs | Comm. (GB) | Lat. (min.) "
              "| Comm. Sav. | Lat. Sav. | Tokens | Params |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = "NaNs" if r.diverged else _f(r.ppl, "{:.3f}")
        if not r.finished:
            ppl += " (unfinished)"
        c = r.cost
        cost = ("– | – | – | – | – | – | –" if c is None else
                f"{c.nonlinear} | {_g(c.ffn_flops)} | {_g(c.attn_flops_paper)} | {_f(c.comm_gb, '{:.3f}')} | "
                f"{_f(c.lat_min, '{:.3f}')} | {_f(c.comm_savings, '{:.2f}×')} | {_f(c.lat_savings, '{:.2f}×')}")
        lines.append(f"| {r.label} | {ppl} | {cost} | {_f(r.tokens_trained, '{:,}')} | {_f(r.params, '{:,}')} |")
    lines += ["", "## Entropy diagnosis (final per-head entropies)", "",
              "Bins as in the paper's Fig. 2a: [0,max/4), [max/4,max/2), [max/2,3max/4), [3max/4,max] with max "
              "the largest head entropy of each run (reported figures). Verdicts (docs/DECISIONS.md): overload = "
              "at least half of a layer's heads at >= 95% of the causal maximum while another layer has left "
              "uniform attention; too early = no layer has left it; collapse = at least half of a layer's heads "
              "below 0.1 nats, or NaN attention.", "",
              "| Network Arch. | bins (% of heads) | max (nats) | layer means (nats) | min deep-half layer mean "
              "| NaN entries | collapse | overload | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.diagnosis
        if d is None:
            lines.append(f"| {r.label} | – | – | – | – | – | – | – | – |")
            continue
        bins = " / ".join(f"{100 * s:.0f}" for s in d.bin_shares)
        means = " ".join(_f(m, "{:.2f}") for m in d.layer_mean_entropy)
        coll = f"yes (L{','.join(map(str, d.collapsed_layers))})" if d.collapsed else "no"
        over = (f"yes (L{','.join(map(str, d.overloaded_layers))})" if d.overloaded
                else "not judged" if d.too_early else "no")
        lines.append(f"| {r.label} | {bins} | {_f(d.bin_max, '{:.2f}')} | {means} | "
                     f"{_f(d.deep_layer_min_entropy, '{:.3f}')} | {_f(d.nan_total, '{:,.0f}')} | {coll} | {over} "
                     f"| {d.verdict} |")
    from privlm.report.analysis import stability_cell_text, stability_map
    from privlm.report.claims import claim_c1_stability, verdict_text
    presets, lrs, cells = stability_map(rows)
    if len(lrs) >= 2:
        lines += ["", "## Stability map (peak learning rate x variant)", "",
                  "PPL: trained to the end; NaN @ s: the update of step s was non-finite, with the flight "
                  "recorder's first event (collapse: a head's entropy below 0.1 nats; logit / resid: a max "
                  "attention logit or residual norm blow-up), how many steps before, and where.", "",
                  "| Network Arch. | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for p in presets:
            lines.append(f"| {p} | " + " | ".join(stability_cell_text(cells.get((p, lr), [])) or "–" for lr in lrs)
                         + " |")
        c1 = claim_c1_stability(rows)
        lines += ["", f"({c1['id']}) {c1['claim']}: {verdict_text(c1)} — {c1['numbers']}"]
    else:
        lines += claims_section(rows)
    diverged = [r for r in rows if r.diverged]
    if diverged:
        lines += ["", "## Divergences", ""] + [f"- **{r.label}**: {r.diagnosis_summary}" for r in diverged]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def claims_section(rows: list[RunRow]) -> list[str]:
    """The claims section of results.md (`privlm.report.claims`)."""
    from privlm.report.claims import claims_markdown
    seeds = max((sum(r.preset == p for r in rows) for p in {r.preset for r in rows}), default=0)
    return ["", f"## The paper's claims on these runs ({'seed means and spreads' if seeds > 1 else 'single seed'})",
            "", "Verdicts are statistics over seeds (docs/DECISIONS.md, \"Claims and seeds\"): paired by seed "
            "where two variants share seeds, a bootstrap confidence interval of the mean difference and an "
            "exact sign-flip p; a claim holds (or is contradicted) only when the interval excludes zero on "
            "the paper's side (or the other).", ""] + claims_markdown(rows)


def write_results(sweep: Sweep, out: Path, results: Optional[Path] = None, title: Optional[str] = None,
                  update_page: bool = True) -> list[RunRow]:
    """results.json, results.md, report.html and figures/ (in ``results``, default ``out``) from the run
    directories that exist under ``out``; and the numbers of a README.md with generated blocks there, unless
    ``update_page`` is off (a caller whose page also reads files it writes afterwards, as the demo's does)."""
    results = results or out
    check_sweep_dir(out)
    results_dir = RunDirectory(results)
    results_dir.mkdir()
    from privlm.report import build_report, collect, load_runs

    dirs = [out / r.name for r in sweep.runs if (out / r.name / "config.yaml").is_file()]
    if not dirs:
        raise CheckpointError(f"no run of sweep '{sweep.name}' exists under '{out}' yet")
    runs = load_runs(dirs)
    baseline = None
    if sweep.baseline is not None:
        baseline = next((r.name for r in sweep.runs if sweep.baseline in (r.name, r.preset)
                         or slug(sweep.baseline) == r.name), None)
        if baseline is not None and not (out / baseline / "config.yaml").is_file():
            baseline = None  # not trained yet: savings relative to the first run
    rows, _, notes = collect(runs, baseline)
    state_file = out / "sweep.json"
    state = read_json(state_file) if state_file.is_file() else {}
    from privlm.report.claims import stored_claims
    _write_json(results_dir.path("results.json"), {"sweep": sweep.name, "sweep_file": str(sweep.path),
                                           "claims": stored_claims(rows),
                                           "command": state.get("command"),
                                           "baseline": baseline or runs[0].path.name, "rows": [r.to_dict() for r in rows],
                                           "run_seconds": {k: v.get("seconds") for k, v in state.get("runs", {}).items()},
                                           "run_intervals": {k: training_intervals(v)
                                                             for k, v in state.get("runs", {}).items()}})
    results_dir.write_text("results.md", results_markdown(sweep, rows, notes))
    if sweep.select is not None:  # settings chosen on the held-out split (privlm.selection)
        from privlm.selection import select
        sel = select(sweep.runs, {r.name: r for r in rows}, out, sweep.select)
        _write_json(results_dir.path("selection.json"), sel)
    build_report(dirs, results_dir.path("report.html"), results_dir.path("figures"), baseline=baseline,
                 title=title or f"privlm sweep {sweep.name}")
    from privlm.report.readme import has_blocks, update_readme
    if update_page and has_blocks(results_dir.path("README.md")):  # a results page with generated numbers
        update_readme(results_dir.path("README.md"))
    return rows


# ----------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_file", metavar="SWEEP.yaml")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/<name>)")
    p.add_argument("--max-runs", type=bounded_int(0, MAX_COUNT), default=None, metavar="N",
                   help="train at most N (unfinished) runs in this call, then stop; rerun to continue")
    p.add_argument("--list", action="store_true", help="print the resolved runs and their status, train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md/results.json/report.html from the existing run directories")
    p.add_argument("--results", metavar="DIR", help="write results.md/.json, report.html and figures/ here "
                   "(default: the sweep directory)")
    p.add_argument("--threads", type=bounded_int(1, 1024), default=None, metavar="N",
                   help="torch CPU threads per run (1 is fastest on a machine shared with other jobs)")
    p.add_argument("--jobs", type=bounded_int(1, 256), default=1, metavar="N",
                   help="train N runs at once, each in its own process with --threads threads (default 1); "
                   "their console output goes to <out>/logs/<run>.log")
    p.add_argument("--verbose", action="store_true",
                   help="no effect (kept for old command lines): each run's live line -- tokens, tok/s, ETA, "
                        "loss -- shows on a terminal, its log lines elsewhere")
    slurm_launcher.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from privlm.train.rundir import run_status
    sweep = load_sweep(args.sweep_file)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / slug(sweep.name)
    if args.max_runs is not None and args.max_runs < 0:
        raise ConfigError(f"--max-runs={args.max_runs} must be >= 0")
    if args.list:
        for r in sweep.runs:
            c = r.cfg
            print(f"{r.name:<28} {r.preset:<22} {run_status(out / r.name):<10} L{c.model.n_layer} "
                  f"d{c.model.n_embd} H{c.model.n_head} T{c.data.seq_len} steps={c.train.max_steps} "
                  f"tokens={c.train.max_steps * c.train.batch_size * c.train.grad_accum * c.data.seq_len:,} "
                  f"seed={c.train.seed} {' '.join(r.overrides)}")
        return 0
    if args.status:
        return slurm_launcher.print_status(sweep, out)
    if args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads={args.threads} must be >= 1")
        import torch
        torch.set_num_threads(args.threads)
    if not args.report_only:
        command = " ".join(["privlm sweep", args.sweep_file, "--out", str(out)]
                           + (["--results", args.results] if args.results else [])
                           + (["--threads", str(args.threads)] if args.threads else [])
                           + (["--jobs", str(args.jobs)] if args.jobs > 1 else []))
        if args.launcher == "slurm":
            if args.jobs > 1:
                raise ConfigError("--jobs sets the local pool's size; with --launcher slurm every run is a job")
            state = slurm_launcher.run_slurm(sweep, out, slurm_launcher.flags_resources(sweep, args), plan=run_sweep,
                                             threads=args.threads, detach=args.detach, max_runs=args.max_runs,
                                             poll=args.poll,
                                             command=" ".join([command] + slurm_launcher.command_flags(args)))
            if state is None:  # --detach: the jobs train on; nothing to tabulate yet
                return 0
        else:
            state = run_sweep(sweep, out, args.max_runs, command=command,
                              jobs=args.jobs, threads=args.threads)
        pending = [r.name for r in sweep.runs if run_status(out / r.name) != "done"]
        if pending:
            print(f"{len(pending)} run(s) not finished yet: {', '.join(pending)}")
        bad = [n for n, rec in state["runs"].items() if rec.get("status") == "diverged"]
        if bad:
            print(f"diverged: {', '.join(bad)}")
    results = Path(args.results) if args.results else out
    rows = write_results(sweep, out, results)
    print(f"wrote {results / 'results.md'}, {results / 'results.json'}, {results / 'report.html'} "
          f"({len(rows)} run(s))")
    return 0
