"""The numbers of the results READMEs, written from the results files between markers.

A README (``docs/results/*/README.md``, the repository's README.md) holds its numbers only in blocks::

    <!-- privlm:begin NAME [DIR] -->
    generated text
    <!-- privlm:end NAME -->

``NAME`` is one of `BLOCKS`; ``DIR`` (default: the README's own folder) is the results folder the block reads,
relative to the README: ``results.json`` (written by `privlm sweep`) and, for the demo blocks, ``demo.json``
(written by `privlm demo`). The prose around the blocks carries no number of its own; `bare_numbers` finds
the lines that do (the docs test runs it on every results README).

- `update_readme(path)` rewrites every block of one README from the files it reads (nothing else changes);
  `privlm sweep` and `privlm demo` call it on the README of their results folder when they write results;
- `stale_blocks(path)` lists the blocks whose committed text differs from what the files give;
- ``python -m privlm.report.readme [--check] [README…]`` (``make docs``) regenerates (or, with ``--check``,
  only checks) the README.md of the repository and every ``docs/results/*/README.md``.

Nothing here executes anything read from disk: the results files are JSON, the READMEs text.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from privlm.errors import OneLineArgumentParser, PrivlmError
from privlm.report import claims as cl
from privlm.report.analysis import causal_max_entropy, stability_cell_text, stability_map
from privlm.results import RunRow, as_rows

BLOCK_RE = re.compile(r"<!-- privlm:begin (?P<name>[\w-]+)(?: (?P<dir>[^\s>]+))? -->(?P<body>.*?)"
                      r"<!-- privlm:end (?P=name) -->", re.S)
OPEN_RE = re.compile(r"<!-- privlm:(?:begin|end) ")


# ---------------------------------------------------------------------------------------------- sources
def _load(folder: Path, name: str) -> dict:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PrivlmError(f"'{path}' does not exist (a README block reads it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrivlmError(f"'{path}' is not a readable JSON results file: {exc}") from None


def _rows(folder: Path) -> list[RunRow]:
    rows = _load(folder, "results.json").get("rows")
    if not isinstance(rows, list) or not rows:
        raise PrivlmError(f"'{folder / 'results.json'}' has no result rows")
    try:
        return as_rows(rows)
    except (TypeError, AttributeError, KeyError) as exc:
        raise PrivlmError(f"'{folder / 'results.json'}' has a malformed result row: {exc}") from None


def _presets(rows: Sequence[RunRow]) -> list[str]:
    out: list[str] = []
    for r in rows:
        if r.preset not in out:
            out.append(r.preset)
    return out


def _seq_len(rows: Sequence[RunRow]) -> Optional[int]:
    """T of the runs: the cost row's T, or (results files written before the row carried it) the census of
    their softmax ops (``SM:n×R^{T×T}``)."""
    for r in rows:
        if r.cost and r.cost.T:
            return int(r.cost.T)
        m = re.search(r"SM:\d+×R\^\{(\d+)×\1\}", r.cost.nonlinear if r.cost else "")
        if m:
            return int(m.group(1))
    return None


def _seeds_text(seeds: Sequence) -> str:
    return ", ".join(str(s) for s in seeds)


def _spread(rows: Sequence[RunRow], preset: str) -> cl.Spread:
    return cl.spread_of(cl.seed_group(rows, preset), cl.ppl_of)


def _ppl_text(s: cl.Spread) -> str:
    return s.text("{:.2f}").replace(f", {s.n} seeds]", "]")


def _means(values: Sequence[Optional[float]]) -> str:
    return " ".join("–" if v is None or not math.isfinite(v) else f"{v:.2f}" for v in values)


# ---------------------------------------------------------------------------------------------- blocks
def block_setup(folder: Path) -> str:
    """Runs, variants, tokens per run, steps, learning rates, seeds, total tokens, the unigram reference."""
    rows = _rows(folder)
    presets = _presets(rows)
    done = [r for r in rows if r.finished and not r.diverged] or rows  # diverged runs stop early
    tokens = sorted({r.tokens_trained for r in done if r.tokens_trained})
    steps = sorted({r.max_steps for r in rows if r.max_steps})
    lrs = sorted({r.lr for r in rows if r.lr is not None})
    seeds = {p: sorted({r.seed for r in rows if r.preset == p}, key=str) for p in presets}
    common = sorted(set.intersection(*(set(s) for s in seeds.values())), key=str)
    extra = {p: [s for s in ss if s not in common] for p, ss in seeds.items()}
    seed_text = f"seed{'s' if len(common) > 1 else ''} {_seeds_text(common)} for every variant"
    more: dict[tuple, list[str]] = {}
    for p, ss in extra.items():
        if ss:
            more.setdefault(tuple(ss), []).append(p)
    for ss, ps in more.items():
        seed_text += f", seed{'s' if len(ss) > 1 else ''} {_seeds_text(ss)} also for {', '.join(ps)}"
    total = sum(r.tokens_trained or 0 for r in rows)
    T = _seq_len(rows)
    stopped = len(rows) - len(done)
    text = (f"{len(rows)} runs of {len(presets)} variant{'s' if len(presets) > 1 else ''}: "
            f"{' / '.join(f'{t:,}' for t in tokens)} training tokens per run "
            f"({' / '.join(f'{s:,}' for s in steps)} optimizer steps), peak learning rate"
            f"{'s' if len(lrs) > 1 else ''} {', '.join(f'{lr:g}' for lr in lrs)}, {seed_text}; "
            f"{total:,} training tokens in all"
            + (f" ({stopped} diverged run{'s' if stopped > 1 else ''} stopped early)." if stopped else "."))
    unigram = sorted({round(r.unigram_ppl, 1) for r in rows if r.unigram_ppl})
    if unigram:
        text += f" Validation PPL of the tokenizer's unigram model: {', '.join(f'{u:.1f}' for u in unigram)}."
    if T:
        text += (f" Entropy of uniform causal attention at T = {T} (the causal maximum): "
                 f"{causal_max_entropy(T):.2f} nats.")
    return text


def block_time(folder: Path) -> str:
    """Training time of the runs (``run_seconds``) and the wall clock it implies with the sweep's --jobs."""
    doc = _load(folder, "results.json")
    secs = [s for s in (doc.get("run_seconds") or {}).values() if s is not None]
    if not secs:
        return "No training times are recorded in `results.json`."
    m = re.search(r"--jobs (\d+)", doc.get("command") or "")
    jobs = int(m.group(1)) if m else 1
    total = sum(secs)
    text = (f"The training times of the {len(secs)} runs (`results.json` → `run_seconds`) add up to "
            f"{total:,.0f} s ({min(secs):.0f}–{max(secs):.0f} s per run)")
    if jobs > 1:
        text += f"; {jobs} at a time, that is at least {total / jobs / 60:.1f} minutes of wall clock"
    busy = busy_seconds(_intervals(folder, doc))
    if busy:
        text += (f"; measured, runs were training during {_duration(busy)} of wall clock (the union of their "
                 f"training intervals, `run_intervals`)")
    return text + "."


def _intervals(folder: Path, doc: dict, run: Optional[str] = None) -> list:
    """The training intervals in a results.json (``run``'s, or every run's); one line naming the file if they are
    not [start, end] pairs of numbers."""
    from privlm.validate import check_intervals
    where = f"'{folder / 'results.json'}': run_intervals"
    got = doc.get("run_intervals") or {}
    if not isinstance(got, dict):
        raise PrivlmError(f"{where} must map each run to its list of [start, end] pairs")
    return [i for name, v in got.items() if run is None or name == run
            for i in check_intervals(v or [], where, PrivlmError)]


def busy_seconds(intervals: Sequence[Sequence[float]]) -> float:
    """Length of the union of [start, end] intervals: the wall clock during which at least one ran."""
    total, end = 0.0, -math.inf
    for a, b in sorted((float(a), float(b)) for a, b in intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def block_study_time(folder: Path) -> str:
    """Wall clock and core time of a study made of several sweeps (each sub-folder's results.json): measured
    from the runs' training intervals, across however many calls and sessions it took."""
    docs = [(sub.name, _load(sub, "results.json")) for sub in sorted(folder.iterdir())
            if (sub / "results.json").is_file()]
    if not docs:
        return "No results yet."
    intervals, core, missing, runs = [], 0.0, [], 0
    for name, doc in docs:
        for run, seconds in (doc.get("run_seconds") or {}).items():
            if seconds is None:
                continue
            runs += 1
            core += seconds
            got = _intervals(folder / name, doc, run)
            intervals += got
            if not got:
                missing.append(f"{name}/{run}")
    text = (f"{runs} runs over {len(docs)} sweeps ({', '.join(f'`{n}/`' for n, _ in docs)}): "
            f"{core / 3600:.1f} core-hours of training")
    if intervals:
        text += (f", during {_duration(busy_seconds(intervals))} of wall clock with at least one run training "
                 f"(measured: the union of the runs' training intervals, whatever the number of calls it took)")
    if missing:
        text += f"; {len(missing)} run(s) have no recorded intervals: {', '.join(missing)}"
    return text + "."


def block_variants(folder: Path) -> str:
    """One line per variant: PPL (seed mean [min–max]), layer-mean entropies of its first seed, verdicts."""
    rows = _rows(folder)
    T = _seq_len(rows)
    n_layers = max(len(r.diagnosis.layer_mean_entropy) if r.diagnosis else 0 for r in rows)
    head = (f"layer-mean entropy L0…L{n_layers - 1}, first seed (nats"
            + (f"; causal maximum {causal_max_entropy(T):.2f})" if T else ")"))
    lines = [f"| variant | seeds | validation PPL | {head} | verdict |", "|---|---|---|---|---|"]
    for p in _presets(rows):
        group = cl.seed_group(rows, p)
        lines.append(f"| {p} | {len(group)} | {_ppl_text(_spread(rows, p))} | "
                     f"{_means(group[0].diagnosis.layer_mean_entropy if group[0].diagnosis else [])} | "
                     f"{cl.verdicts_of(group)} |")
    return "\n".join(lines)


def _claims(rows: Sequence[RunRow]) -> list[dict]:
    _, lrs, _ = stability_map(rows)
    if len(lrs) >= 2:
        c = cl.claim_c1_stability(rows)
        return [c] if c else []
    return cl.evaluate_claims(rows)


def block_claims(folder: Path) -> str:
    """The paper's claims on the rows (`privlm.report.claims`): verdict and the numbers behind it."""
    claims = _claims(_rows(folder))
    lines = [f"- **({c['id']}) {c['claim']}: {c.get('verdict') or cl.verdict_text(c)}.** {c['numbers']}"
             for c in claims if c.get("verdict") != cl.UNTESTABLE and c.get("holds") is not None]
    untestable = [c["id"] for c in claims if (c.get("verdict") == cl.UNTESTABLE or c.get("holds") is None)]
    if untestable:
        lines.append(f"- not testable on these runs (variants missing): {', '.join(untestable)}")
    return "\n".join(lines)


def _grid_params(name: str) -> dict[str, str]:
    """'ereg-lambda=1e-05-gamma=0.1' -> {'lambda': '1e-05', 'gamma': '0.1'} (the sweep's grid run names)."""
    return dict(part.split("=", 1) for part in re.split(r"-(?=[a-z_]+=)", name) if "=" in part)


def block_grid(folder: Path) -> str:
    """A two-parameter grid sweep as a table (PPL and verdict per cell), the reference run without the grid's
    parameters, and the best cell against it."""
    rows = _rows(folder)
    cells = {}
    for r in rows:
        params = _grid_params(r.name)
        if len(params) == 2:
            cells[tuple(params.values())] = r
    if not cells:
        raise PrivlmError(f"'{folder / 'results.json'}' has no two-parameter grid runs")
    keys = list(_grid_params(next(r.name for r in rows if len(_grid_params(r.name)) == 2)))
    a_vals = sorted({k[0] for k in cells}, key=float)
    b_vals = sorted({k[1] for k in cells}, key=float)

    def cell(r: RunRow) -> str:
        return f"{_ppl_text(_spread([r], r.preset))} ({'diverged' if r.diverged else r.verdict})"

    lines = [f"| {keys[0]} \\ {keys[1]} | " + " | ".join(b_vals) + " |", "|---|" + "---|" * len(b_vals)]
    for a in a_vals:
        lines.append(f"| {a} | " + " | ".join(cell(cells[(a, b)]) if (a, b) in cells else "–" for b in b_vals)
                     + " |")
    refs = [r for r in rows if len(_grid_params(r.name)) != 2]
    best_key, best = min(cells.items(), key=lambda kv: cl.ppl_of(kv[1]))
    pb = cl.ppl_of(best)
    summary = [f"Best cell: {keys[0]} {best_key[0]}, {keys[1]} {best_key[1]}, PPL {pb:.2f}."]
    for ref in refs:
        p = cl.ppl_of(ref)
        summary.append(f"Without the grid's parameters ({ref.preset}): PPL {p:.2f} ({ref.verdict}); the "
                       f"best cell is {abs(p - pb) / p * 100:.1f} % {'lower' if pb <= p else 'higher'}.")
    return "\n".join(lines + ["", " ".join(summary)])


def block_stability(folder: Path) -> str:
    """Variant × peak learning rate: PPL or the divergence step with the flight recorder's first event."""
    rows = _rows(folder)
    presets, lrs, cells = stability_map(rows)
    lines = ["| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for p in presets:
        lines.append(f"| {p} | " + " | ".join(stability_cell_text(cells.get((p, lr), [])) or "–" for lr in lrs)
                     + " |")
    return "\n".join(lines)


def block_divergences(folder: Path) -> str:
    """Every diverged run: its step and the flight recorder's line."""
    rows = [r for r in _rows(folder) if r.diverged]
    if not rows:
        return "No run diverged."
    flights = [r.flight for r in rows if r.flight and r.flight.first]
    early = sum(1 for f in flights if f.first == "collapse" and tuple(f.first_all or ("collapse",)) == ("collapse",))
    out = [f"{len(rows)} run{'s' if len(rows) > 1 else ''} diverged; the flight recorder saw entropy collapse strictly "
           f"before both logit and residual blow-up in {early} of the {len(flights)} with a recorded event:"]
    for r in rows:
        fl = r.flight.line if r.flight and r.flight.line else "no flight record"
        out.append(f"- **{r.preset}, lr {r.lr:g}**: non-finite update at step {r.divergence_step}; {fl}")
    return "\n".join(out)


def block_demo_time(folder: Path) -> str:
    """Wall and CPU time of `privlm demo` (demo.json)."""
    d = _load(folder, "demo.json")
    pi = d.get("pi") or {}
    text = (f"{d['total_seconds']:.0f} s of wall clock for the demo (training {d['train_seconds']:.0f} s, "
            f"{d['jobs']} runs at a time with one torch thread each, {d['train_cpu_seconds']:.0f} core-seconds")
    if pi.get("wall_seconds") is not None:
        text += f"; private inference {pi['wall_seconds']:.0f} s"
    load = d.get("load_average")
    if load:
        text += f"; load average {load[0]:.1f} when it ended"
    return text + ")"


def block_demo_summary(folder: Path) -> str:
    """The demo's designs (results.json) and its private prediction (demo.json)."""
    rows = _rows(folder)
    d = _load(folder, "demo.json")
    T = _seq_len(rows)
    tokens = sorted({r.tokens_trained for r in rows if r.tokens_trained})
    lines = [f"{' / '.join(f'{t:,}' for t in tokens)} training tokens per design"
             + (f"; the causal maximum at T = {T} is {causal_max_entropy(T):.3f} nats" if T else "") + ".", "",
             "| design | validation PPL | layer-mean entropy (nats) | verdict | predicted Comm (GB) | Comm sav. "
             "| top-bin share |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = "NaN (diverged)" if r.diverged or r.ppl is None else f"{r.ppl:.2f}"
        comm = "–" if r.cost is None else f"{r.cost.comm_gb:.3f}"
        sav = "–" if r.cost is None or r.cost.comm_savings is None else f"{r.cost.comm_savings:.2f}×"
        top = "–" if r.diagnosis is None else f"{100 * r.diagnosis.top_bin_share:.0f} %"
        means = _means(r.diagnosis.layer_mean_entropy if r.diagnosis else [])
        lines.append(f"| {r.preset} | {ppl} | {means} | {r.verdict} "
                     f"| {comm} | {sav} | {top} |")
    pi = d.get("pi")
    if pi:
        agree = {True: "agrees with", False: "differs from", None: "was not compared with"}[pi.get("top1_agree")]
        err = pi.get("max_logit_err")
        lines += ["", f"The private next-token prediction (SPU {pi['protocol']}, `{pi.get('spu_profile', 'default')}` "
                      f"profile, {pi['mode']} mode, {pi['T']} prompt tokens) {agree} plaintext"
                      + (f" (max logit error {err:.4f})" if err is not None else "")
                      + f" and exchanges {pi['bytes_total'] / 1e6:.1f} MB in {pi['messages']:,} messages."]
    elif d.get("pi_error"):
        lines += ["", f"The private prediction failed: {d['pi_error']}"]
    return "\n".join(lines)


def block_demo_regularizer(folder: Path) -> str:
    """What the demo says about the regularizer (demo.json's ``regularizer_effect``, written by `privlm demo`
    from the 3-seed measurement in bench/results/demo_settings.json, with the study's paired result beside it
    when that measurement or the demo's rows do not show the effect)."""
    d = _load(folder, "demo.json")
    lines = d.get("regularizer_effect")
    if not lines:
        return "This demo.json records no statement about the regularizer (written before the demo made one)."
    return "\n".join(f"- {ln}" for ln in lines)


def block_study_summary(folder: Path) -> str:
    """One paragraph of a study for the repository README: size, seeds, each claim's verdict, C4's numbers."""
    rows = _rows(folder)
    presets = _presets(rows)
    tokens = sorted({r.tokens_trained for r in rows if r.tokens_trained})
    seeded = [p for p in presets if len(cl.seed_group(rows, p)) > 1]
    n_seeds = max((len(cl.seed_group(rows, p)) for p in presets), default=1)
    text = (f"{len(presets)} variants at {' / '.join(f'{t / 1e6:.1f} M' for t in tokens)} training tokens each"
            + (f", {n_seeds} seeds for {len(seeded)} of them" if seeded else "") + "; claims: "
            + ", ".join(f"{c['id']} {c.get('verdict') or cl.verdict_text(c)}" for c in _claims(rows)))
    e, s = _spread(rows, "EReg(SM(t)+ScFuFFN)"), _spread(rows, "SM+ScFuFFN")
    if e.n and s.n and math.isfinite(e.mean) and math.isfinite(s.mean):
        rel = (s.mean - e.mean) / s.mean * 100
        text += (f"; the entropy regularizer {'lowers' if rel >= 0 else 'raises'} the PPL of SM(t)+ScFuFFN by "
                 f"{abs(rel):.1f} % against SM+ScFuFFN ({e.mean:.2f} vs {s.mean:.2f}" + (f", means over {min(e.n, s.n)} seeds" if min(e.n, s.n) > 1 else "")
                 + ")")
    return text


def block_selection(folder: Path) -> str:
    """A selection sweep's choice (selection.json, written by `privlm.selection`): held-out and validation PPL
    per run, the selected run and the overrides it hands on."""
    sel = _load(folder, "selection.json")
    try:
        keys, runs, chosen = sel["keys"], sel["runs"], sel["selected"]
        lines = ["| run | " + " | ".join(keys) + " | held-out PPL | validation PPL | verdict |",
                 "|---|" + "---|" * (len(keys) + 3)]
        for s in runs:
            vals = " | ".join("–" if not s.get("candidate", True) else  # a reference: the keys are not its
                              f"{s['values'][k]:g}" if isinstance(s["values"][k], float) else str(s["values"][k])
                              for k in keys)
            mark = "**" if s["name"] == chosen else ""
            valid = "–" if s["valid_ppl"] is None else f"{s['valid_ppl']:.2f}"
            lines.append(f"| {mark}{s['name']}{mark} | {vals} | {s['heldout_ppl']:.2f} | {valid} | {s['verdict']} |")
        text = "\n".join(lines)
        if chosen:
            text += (f"\n\nSelected ({sel['rule']}): **{chosen}**, handed to the study as "
                     f"{', '.join(f'`{o}`' for o in sel['overrides'])}.")
        else:
            text += "\n\nNothing selected yet: no candidate run has finished."
        if sel.get("not_finished"):
            text += f" Not finished: {', '.join(sel['not_finished'])}."
    except (KeyError, TypeError, ValueError) as exc:
        raise PrivlmError(f"'{folder / 'selection.json'}' is not a selection file: {exc}") from None
    return text


BLOCKS: dict[str, Callable[[Path], str]] = {
    "setup": block_setup,
    "time": block_time,
    "variants": block_variants,
    "claims": block_claims,
    "grid": block_grid,
    "stability": block_stability,
    "divergences": block_divergences,
    "study-time": block_study_time,
    "demo-time": block_demo_time,
    "demo-summary": block_demo_summary,
    "demo-regularizer": block_demo_regularizer,
    "study-summary": block_study_summary,
    "selection": block_selection,
}


# ---------------------------------------------------------------------------------------------- READMEs
def render(text: str, base: Path) -> str:
    """``text`` with every block regenerated; ``base`` is the folder its DIRs are relative to."""
    def one(m: re.Match) -> str:
        name, sub = m.group("name"), m.group("dir") or "."
        if name not in BLOCKS:
            raise PrivlmError(f"unknown README block '{name}' (known: {', '.join(BLOCKS)})")
        body = BLOCKS[name](base / sub).strip()
        inner = f"\n{body}\n" if m.group("body").startswith("\n") else body
        return m.group(0)[:m.start("body") - m.start()] + inner + f"<!-- privlm:end {name} -->"

    out = BLOCK_RE.sub(one, text)
    if len(OPEN_RE.findall(text)) != 2 * len(BLOCK_RE.findall(text)):
        raise PrivlmError("a README block marker has no partner (begin and end must name the same block)")
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrivlmError(f"cannot read '{path}': {exc}") from None


def has_blocks(path: Path) -> bool:
    return path.is_file() and bool(BLOCK_RE.search(_read(path)))


def update_readme(path: Path) -> bool:
    """Regenerate the blocks of the README at ``path``; True when its text changed."""
    from privlm.fileio import atomic_write_text

    old = _read(path)
    new = render(old, path.parent)
    if new != old:
        atomic_write_text(path, new)
    return new != old


def stale_blocks(path: Path) -> list[str]:
    """Names of the blocks of ``path`` whose text differs from what the results files give."""
    old = _read(path)
    fresh = list(BLOCK_RE.finditer(render(old, path.parent)))
    return [m.group("name") + (f" {m.group('dir')}" if m.group("dir") else "")
            for m, f in zip(BLOCK_RE.finditer(old), fresh) if f.group("body") != m.group("body")]


# Tokens that look like numbers but are names: model shapes (L4, d128, H4, T = 128), the paper's claims,
# figures, tables and equations, GPT-2, 2PC, study versions, the paper's year, list numbering.
ALLOWED = re.compile(
    r"\b[LHdT]\d+\b|\bT ?= ?\d+\b|\bC[1-4]\b|\b(?:Figs?|Eq|Table|Tables|Algorithm)\.? ?\d+[a-z]?(?:[–/-]\d+[a-z]?)*"
    r"|\bGPT-2\b|\b2PC\b|\bv\d\b|Reagen,? \d{4}|^\s*\d+\. ")
_HIDDEN = re.compile(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->|https?://\S+")


def bare_numbers(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every prose line with a digit outside a generated block, a code span or fence,
    a link target, and the names in `ALLOWED`."""
    # each block becomes as many newlines as it spans, so that line numbers stay those of ``text``
    prose = BLOCK_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    out, fence = [], False
    for no, line in enumerate(prose.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        visible = ALLOWED.sub("", _HIDDEN.sub("", line))
        if re.search(r"\d", visible):
            out.append((no, line))
    return out


# The repository README holds its results in one section; the rest of it describes the product.
README_RESULTS_SECTION = "## Reports, sweeps and the CPU-scale study"


def results_prose(text: str) -> str:
    """The part of a README whose prose must carry no number of its own: the results section of the
    repository README (the README with a `README_RESULTS_SECTION` heading; other lines blanked, so line numbers
    stay), all of any other README (a results page)."""
    if README_RESULTS_SECTION not in text.split("\n"):
        return text
    lines, inside = [], False
    for line in text.split("\n"):
        if line.startswith("## "):
            inside = line.strip() == README_RESULTS_SECTION
        lines.append(line if inside else "")
    return "\n".join(lines)


def repository_readmes(root: Path) -> list[Path]:
    """README.md of the repository and of every results folder under docs/results."""
    return [p for p in [root / "README.md", *sorted((root / "docs" / "results").glob("*/README.md"))] if p.is_file()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "python -m privlm.report.readme"
    ap = OneLineArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("readmes", nargs="*", metavar="README", help="default: README.md and docs/results/*/README.md")
    ap.add_argument("--check", action="store_true", help="only report blocks that differ; exit 1 if any")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.readmes] or repository_readmes(Path.cwd())
    try:
        bad = 0
        for path in paths:
            if args.check:
                stale = stale_blocks(path)
                text = _read(path)
                loose = bare_numbers(results_prose(text))
                for name in stale:
                    print(f"{path}: block '{name}' differs from its results files", file=sys.stderr)
                for no, line in loose:
                    print(f"{path}:{no}: number outside a generated block: {line.strip()[:100]}", file=sys.stderr)
                bad += len(stale) + len(loose)
            else:
                print(f"{path}: {'updated' if update_readme(path) else 'up to date'}")
    except PrivlmError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a README that cannot be written
        print(f"{prog}: error: {exc.strerror or exc}: '{exc.filename}'", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
