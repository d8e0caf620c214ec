"""`privlm demo [--out DIR] [--jobs N] [--pi-args "..."]`: the paper's story in a few minutes on a CPU.

Trains the runs of a sweep file (default ``configs/sweeps/demo.yaml``: the baseline SM+LN+G, the softmax-only
SM+ScFuFFN and the regularized EReg(SM(t)+ScFuFFN), same data, budget and seed) several at a time with one
torch thread each, runs one private next-token prediction of the softmax-only model under SecretFlow SPU
(`privlm pi run --mode sim`), and prints one comparison table: validation PPL, entropy verdicts per layer,
nonlinear ops, and predicted 2PC communication/latency with savings at the demo size and at GPT-2 size under
each cost profile of --cost-profiles (default: the fitted paper-fit beside the measured SPU engines), each
column labelled with its profile. Below it, the regularizer's effect at this budget as measured on 3 seeds
(bench/results/demo_settings.json): only when that measurement shows it in the paper's direction beyond the
seed spread, and this run's rows agree, does the demo say so; otherwise it says plainly that it does not and
prints the study's committed paired result (docs/results/cpu-study-v2/results.json) beside it. The results
(results.md/json, report.html with every figure, demo.md) are the sweep's, written into DIR.

An interrupted demo continues where it stopped when rerun with the same --out (finished runs are kept,
runs with a checkpoint resume).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from privlm.errors import PrivlmError, bounded_int
from privlm.validate import read_json
from privlm.pi.summary import CostSummary
from privlm.results import RunRow, as_rows

DEFAULT_SWEEP = "configs/sweeps/demo.yaml"
# A prompt from the training distribution (Python source); 24 tokens with the demo's 2K BPE.
DEFAULT_PROMPT = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        return"
PI_PRESET = "SM+ScFuFFN"  # the softmax-only design the private inference runs on
GPT2_T = 128  # the paper's Table 3 context length
# Cost profiles of the table (privlm cost --list-profiles): the fit to the paper's published rows beside the
# measured SPU engines. A further profile (e.g. a paper-era engine) is one more name here or in --cost-profiles.
DEFAULT_COST_PROFILES = ("paper-fit", "spu-puma-measured", "spu-cheetah-measured")
ROOT = Path(__file__).resolve().parents[2]
# The 3-seed measurement of the regularizer at the demo's budget (bench/demo_settings.py) and the study whose
# paired C4 result the demo prints when that measurement does not show the effect.
DEFAULT_SETTINGS_RESULTS = ROOT / "bench" / "results" / "demo_settings.json"
DEFAULT_STUDY_RESULTS = ROOT / "docs" / "results" / "cpu-study-v2" / "results.json"
EREG_PRESET, PLAIN_PRESET = "EReg(SM(t)+ScFuFFN)", "SM+ScFuFFN"


def train_runs(sweep, out: Path, jobs: int, log=print) -> dict[str, float]:
    """Train every unfinished run of ``sweep`` under ``out`` with the sweep runner, ``jobs`` processes at a
    time (one torch thread each). Returns the wall seconds of each run trained so far."""
    from privlm.sweep import run_sweep

    state = run_sweep(sweep, out, log=log, jobs=jobs)  # a failed run raises there, naming its log
    return {name: rec["seconds"] for name, rec in state["runs"].items() if "seconds" in rec}


DEFAULT_PI_ARGS = "--spu-profile puma"


def private_prediction(run_dir: Path, prompt: str, pi_args: list[str]) -> dict:
    """`privlm pi run RUN_DIR --mode sim --head last --json` (plus ``pi_args``), saved as the run's
    pi_measured.json so the report shows the measured bytes beside the predicted ones."""
    from privlm.fileio import atomic_write_json

    from privlm.proc import interrupt_on_term, spawn, stop

    cmd = [sys.executable, "-m", "privlm.cli", "pi", "run", str(run_dir), "--mode", "sim", "--head", "last",
           "--prompt", prompt, "--json", *pi_args]
    proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # a child that dies with the demo, and that a Ctrl-C or SIGTERM of the demo stops
        with interrupt_on_term():
            stdout, stderr = proc.communicate()
    finally:
        stop([proc])
    if proc.returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        raise PrivlmError(f"private inference failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    doc = json.loads(stdout)
    atomic_write_json(run_dir / "pi_measured.json", doc)
    return doc


_CENSUS: dict = {}  # (model config, T) -> Census: one forward pass per architecture, however many profiles


def _cost(model_cfg, T: int, profile: str) -> CostSummary:
    from privlm.pi import census, predict

    key = (repr(model_cfg), T)
    if key not in _CENSUS:
        _CENSUS[key] = census(model_cfg, T)
    c = _CENSUS[key]
    return CostSummary.of(c, predict(c, profile))


def gpt2_costs(rows: list[RunRow], baseline_preset: str, profile: str) -> dict[str, CostSummary]:
    """Predicted 2PC cost of each row's preset at GPT-2 size (L12 H12 d768, 50K vocabulary, T=128) and its
    savings relative to the baseline preset at the same size."""
    from privlm.config import load_config

    ref = _cost(load_config(baseline_preset).model, GPT2_T, profile)
    return {r.name: _cost(load_config(r.preset).model, GPT2_T, profile).relative_to(ref) for r in as_rows(rows)}


def demo_costs(models: dict, baseline: str, profile: str, T: int) -> dict[str, CostSummary]:
    """Predicted 2PC cost of each run's own model (``models``: {run name: ModelConfig}) at the demo's T under
    ``profile``, with savings relative to run ``baseline``."""
    costs = {name: _cost(m, T, profile) for name, m in models.items()}
    return {name: c.relative_to(costs[baseline]) for name, c in costs.items()}


def profile_label(profile: str) -> str:
    """``name (kind)``: how a cost column says which profile it is, e.g. ``spu-cheetah-measured (measured)``."""
    from privlm.pi.costs import load_profile

    kind = load_profile(profile).provenance.get("kind")
    return f"{profile} ({kind})" if kind else profile


def check_profiles(profiles: list[str]) -> None:
    """Every profile loads (a one-line ConfigError naming it otherwise): checked before anything trains."""
    from privlm.pi.costs import load_profile

    if not profiles:
        raise PrivlmError("--cost-profiles is empty; name at least one profile (privlm cost --list-profiles)")
    for p in profiles:
        load_profile(p)


def _fmt(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _cost_cell(c: Optional[CostSummary], digits: int) -> str:
    if c is None:
        return "–"
    return (f"{c.comm_gb:.{digits}f} GB / {c.lat_min:.2f} min ({_fmt(c.comm_savings, '.2f')}× / "
            f"{_fmt(c.lat_savings, '.2f')}×)")


def comparison_table(rows: list[RunRow], costs: dict[str, tuple[dict, dict]], demo_size: str,
                     labels: Optional[dict[str, str]] = None) -> list[str]:
    """The demo's one table (markdown): quality, entropy verdicts, nonlinear ops, and for every cost profile
    (``costs``: {profile: ({run: cost at the demo size}, {run: cost at GPT-2 size})}, in column order) the
    predicted Comm / Lat with savings at both sizes, each column headed by the profile's label."""
    rows = as_rows(rows)
    labels = labels or {}
    n_layers = max(len(r.diagnosis.layer_verdicts) if r.diagnosis else 0 for r in rows)
    head = (["design", "val PPL", "entropy verdict"] + [f"L{i}" for i in range(n_layers)] + ["#nonlinear ops"])
    for p in costs:
        head += [f"{labels.get(p, p)}: {demo_size}", f"{labels.get(p, p)}: GPT-2"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = "NaN (diverged)" if r.diverged else _fmt(r.ppl, ".2f")
        layers = []
        d = r.diagnosis
        excess = d.excess_vs_baseline if d else None
        for i in range(n_layers):
            if d is None or i >= len(d.layer_verdicts):
                layers.append("")
                continue
            cell = f"{_fmt(d.layer_mean_entropy[i], '.2f')} {d.layer_verdicts[i]}"
            if excess is not None and excess[i] is not None:
                cell += f" ({excess[i]:+.2f})"
            layers.append(cell)
        ops = next((c[0][r.name].nonlinear for c in costs.values() if r.name in c[0]),
                   r.cost.nonlinear if r.cost else "–")
        cells = [r.label, ppl, r.verdict or "–", *layers, ops]
        for demo_c, gpt2_c in costs.values():
            cells += [_cost_cell(demo_c.get(r.name), 3), _cost_cell(gpt2_c.get(r.name), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _span(st: dict, fmt: str) -> str:
    return f"{format(st['mean'], fmt)} [{format(st['min'], fmt)}, {format(st['max'], fmt)}]"


def regularizer_effect(rows: list[RunRow], reg, settings: Optional[dict], study: Optional[dict],
                       settings_name: str = "bench/results/demo_settings.json",
                       study_name: str = "docs/results/cpu-study-v2") -> list[str]:
    """What the demo may say about the regularizer. ``reg``: the demo's EReg run's RegConfig; ``settings``:
    bench/demo_settings.py's results (3 seeds, paired with the unregularized SM(t)+ScFuFFN); ``study``: a
    study's results.json. "Shows" only when the 3-seed measurement of this very setting puts every seed's
    paired difference on the paper's side for held-out PPL and layer 0-1 entropy *and* this run's own rows
    agree (EReg below SM+ScFuFFN in PPL and in the mean entropy of layers 0-1); otherwise it says it does not,
    and prints the study's committed paired C4 result beside it."""
    from privlm.presets import normalize_name

    rows = as_rows(rows)
    by = {normalize_name(r.preset): r for r in rows}
    ereg, plain = by.get(normalize_name(EREG_PRESET)), by.get(normalize_name(PLAIN_PRESET))
    if ereg is None or plain is None:
        return []
    out = []
    here = None
    if ereg.ppl is not None and plain.ppl is not None and ereg.diagnosis and plain.diagnosis:
        e0 = sum(ereg.diagnosis.layer_mean_entropy[:2]) / 2
        p0 = sum(plain.diagnosis.layer_mean_entropy[:2]) / 2
        here = ereg.ppl < plain.ppl and e0 < p0
        out.append(f"This run (one seed): {EREG_PRESET} PPL {ereg.ppl:.2f} vs {PLAIN_PRESET} {plain.ppl:.2f} "
                   f"({'lower' if ereg.ppl < plain.ppl else 'not lower'}); mean entropy of layers 0-1 "
                   f"{e0:.2f} vs {p0:.2f} nats ({'lower' if e0 < p0 else 'not lower'}).")
    match = None
    for e in (settings or {}).get("settings", []):
        r = e.get("reg") or {}
        if (e.get("setting") != "control" and r.get("enabled") and r.get("lambda") == reg.lambda_
                and r.get("gamma") == reg.gamma and r.get("theta_init") == reg.theta_init
                and r.get("reduction") == reg.reduction):
            match = e
    measured = False
    if match is not None and match.get("diff_heldout_ppl", {}).get("n"):
        dh, dv, de = match["diff_heldout_ppl"], match["diff_valid_ppl"], match["diff_early_entropy"]
        measured = bool(dh["n"] >= 3 and de["n"] >= 3 and dh["max"] < 0 and de["max"] < 0)
        out.append(f"Regularizer at this budget, {dh['n']} seeds ({settings_name}, setting {match['setting']}: "
                   f"λ={reg.lambda_:g}, γ={reg.gamma:g}, θ init {reg.theta_init:g}, {reg.reduction}), "
                   f"EReg − SM(t)+ScFuFFN paired by seed, mean [min, max]: held-out PPL {_span(dh, '+.2f')}, "
                   f"valid PPL {_span(dv, '+.2f')}, entropy of layers 0-1 {_span(de, '+.3f')} nats.")
    else:
        out.append(f"Regularizer at this budget: no 3-seed measurement of this setting (λ={reg.lambda_:g}, "
                   f"γ={reg.gamma:g}, θ init {reg.theta_init:g}, {reg.reduction}) in {settings_name}.")
    if measured and here:
        out.append("Verdict: the regularizer lowers PPL and early-layer entropy at this budget, in the paper's "
                   "direction, beyond the spread of 3 seeds.")
        return out
    out.append("Verdict: at this budget the demo does NOT show the regularizer's effect in the paper's direction "
               "beyond the spread of 3 seeds" + ("" if measured or match is None else
                                                   " (the seeds' paired differences straddle zero or point the "
                                                   "other way)")
               + (" (the 3 seeds do, this run does not)" if measured and here is False else "") + ".")
    c4 = next((c for c in (study or {}).get("claims", []) if c.get("id") == "C4"), None)
    if c4 is not None:
        out.append(f"The study's committed paired result ({study_name}, C4 '{c4['claim']}'): {c4['verdict']}; "
                   f"{c4['numbers']}")
    return out


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pi_line(run_label: str, doc: dict) -> str:
    agree = {True: "agrees with", False: "DIFFERS from", None: "not compared with"}[doc.get("top1_agree")]
    err = doc.get("max_logit_err")
    return (f"private next-token prediction of {run_label} under 2PC (SPU {doc['protocol']}, profile "
            f"{doc.get('spu_profile', 'default')}, {doc['mode']}, "
            f"T={doc['T']} prompt tokens): {doc.get('predicted_text', doc['predicted_token'])!r} (token "
            f"{doc['predicted_token']}), {agree} plaintext (max |logit error| "
            f"{'–' if err is None else f'{err:.4f}'}); {doc['bytes_total'] / 1e6:.1f} MB exchanged, "
            f"{doc['messages']:,} messages, {doc['wall_seconds']:.0f} s")


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of every child process waited for so far: the demo's work in core-seconds,
    which, unlike wall time, hardly depends on what else the machine is running."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_demo(sweep_path: str, out: Path, jobs: int, prompt: str, pi_args: list[str], skip_pi: bool = False,
             log=print, profiles: Optional[list[str]] = None, settings_path: Path = DEFAULT_SETTINGS_RESULTS,
             study_path: Path = DEFAULT_STUDY_RESULTS) -> dict:
    from privlm.data import prepare_data
    from privlm.fileio import atomic_write_json, atomic_write_text
    from privlm.presets import normalize_name
    from privlm.sweep import load_sweep, write_results

    t_start = time.time()
    profiles = list(DEFAULT_COST_PROFILES if profiles is None else profiles)
    check_profiles(profiles)
    sweep = load_sweep(sweep_path)
    first = sweep.runs[0].cfg
    m, d, t = first.model, first.data, first.train
    demo_size = f"L{m.n_layer} d{m.n_embd} H{m.n_head}, T={d.seq_len}"
    tokens = t.max_steps * t.batch_size * t.grad_accum * d.seq_len
    log(f"privlm demo: {len(sweep.runs)} designs ({', '.join(r.preset for r in sweep.runs)}) at {demo_size}, "
        f"{tokens:,} training tokens each on the '{d.source}' corpus, {jobs} at a time (one thread each)")
    t0, cpu0 = time.time(), _children_cpu_seconds()
    prepare_data(d, None)  # build (or find) the shared token cache once, before the runs start
    log(f"data ready in {time.time() - t0:.0f} s")
    seconds = train_runs(sweep, out, jobs, log)
    t_train, cpu_train = time.time() - t0, _children_cpu_seconds() - cpu0

    pi_doc, pi_error, cpu_pi = None, None, 0.0
    pi_run = next((r for r in sweep.runs if normalize_name(r.preset) == normalize_name(PI_PRESET)), None)
    if not skip_pi and pi_run is not None:
        log(f"private inference of {pi_run.name} under SPU (privlm pi run --mode sim {' '.join(pi_args)})...")
        cpu_pi0 = _children_cpu_seconds()
        try:
            pi_doc = private_prediction(out / pi_run.name, prompt, pi_args)
        except PrivlmError as exc:
            pi_error = str(exc)
        cpu_pi = _children_cpu_seconds() - cpu_pi0
    elif pi_run is not None and (out / pi_run.name / "pi_measured.json").is_file():
        pi_doc = read_json(out / pi_run.name / "pi_measured.json")  # from an earlier call

    rows = write_results(sweep, out, title="privlm demo: baseline vs softmax-only vs entropy-regularized",
                         update_page=False)  # the page reads demo.json too: updated once it is written, below
    base_row = next((r for r in rows if sweep.baseline in (r.name, r.preset)), rows[0])
    from privlm.run import load_run_config
    # each run's own saved model config (its vocabulary is the trained tokenizer's, not the config default)
    models = {row.name: load_run_config(out / row.name).model for row in rows}
    costs = {p: (demo_costs(models, base_row.name, p, d.seq_len), gpt2_costs(rows, base_row.preset, p))
             for p in profiles}
    labels = {p: profile_label(p) for p in profiles}
    table = comparison_table(rows, costs, demo_size, labels)
    lines = ["", f"Comparison ({tokens:,} training tokens per design; PPL on the whole validation split; per "
                 f"layer: mean head entropy in nats, verdict, difference from the baseline's layer; costs: "
                 f"predicted 2PC Comm / Lat of one token after a {d.seq_len}-token prompt (savings vs "
                 f"{base_row.preset}) under each cost profile: {'; '.join(labels.values())}):", ""] + table
    ereg_run = next((r for r in sweep.runs if r.cfg.reg.enabled), None)
    effect = [] if ereg_run is None else regularizer_effect(
        rows, ereg_run.cfg.reg, _read_json(Path(settings_path)), _read_json(Path(study_path)),
        _rel(Path(settings_path)), _rel(Path(study_path).parent))
    if effect:
        lines += [""] + effect
    if pi_doc is not None:
        lines += ["", pi_line(pi_run.name, pi_doc)]
    elif pi_error is not None:
        lines += ["", f"private inference: {pi_error}"]
    report = out / "report.html"
    total = time.time() - t_start
    lines += ["", f"HTML report of the runs: {report.resolve()}",
              f"demo wall time {total:.0f} s (training {t_train:.0f} s"
              + (f", private inference {pi_doc['wall_seconds']:.0f} s" if pi_doc and not skip_pi else "")
              + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU time of the training "
              f"processes {cpu_train:.0f} core-s)"]
    for line in lines:
        log(line)
    atomic_write_text(out / "demo.md", "\n".join(lines).strip() + "\n")
    atomic_write_json(out / "demo.json", {"sweep_file": sweep_path, "jobs": jobs, "run_seconds": seconds,
                                          "train_seconds": round(t_train, 1), "total_seconds": round(total, 1),
                                          "train_cpu_seconds": round(cpu_train, 1), "pi_cpu_seconds": round(cpu_pi, 1),
                                          "load_average": os.getloadavg(), "pi": pi_doc, "pi_error": pi_error,
                                          "cost_profiles": profiles, "regularizer_effect": effect})
    from privlm.report.readme import has_blocks, update_readme
    if has_blocks(out / "README.md"):  # the committed demo page (docs/results/demo): its numbers follow demo.json
        update_readme(out / "README.md")
    if pi_error is not None:
        raise PrivlmError(pi_error + f" (the rest of the demo is in {out})")
    return {"rows": rows, "pi": pi_doc}


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise PrivlmError(f"--jobs={args.jobs} must be >= 1")
    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    profiles = [p.strip() for p in args.cost_profiles.split(",") if p.strip()]
    run_demo(args.sweep, out, args.jobs, args.prompt, shlex.split(args.pi_args), args.skip_pi, profiles=profiles)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"sweep file of the runs (default {DEFAULT_SWEEP})")
    p.add_argument("--out", help="demo directory (default runs/demo-<time>); rerun with it to continue")
    p.add_argument("--jobs", type=bounded_int(1, 256), default=3,
                   help="runs trained at once, one torch thread each (default 3)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the private next-token prediction")
    p.add_argument("--pi-args", default=DEFAULT_PI_ARGS,
                   help=f"flags for `privlm pi run` (default \"{DEFAULT_PI_ARGS}\": the SPU profile closest to the "
                        f"paper's engine)")
    p.add_argument("--cost-profiles", default=",".join(DEFAULT_COST_PROFILES),
                   help="comma-separated cost profiles of the table's columns, each labelled (default "
                        f"{','.join(DEFAULT_COST_PROFILES)}; privlm cost --list-profiles)")
    p.add_argument("--skip-pi", action="store_true", help="no private inference (no SPU environment needed)")
    p.set_defaults(func=run)
