"""`privlm demo [--out DIR] [--jobs N] [--pi-args "..."]`: the paper's story in a few minutes on a CPU.

Trains the runs of a sweep file (default ``configs/sweeps/demo.yaml``: the baseline SM+LN+G, the softmax-only
SM+ScFuFFN and the regularized EReg(SM(t)+ScFuFFN), same data, budget and seed) several at a time with one
torch thread each, runs one private next-token prediction of the softmax-only model under SecretFlow SPU
(`privlm pi run --mode sim`), and prints one comparison table: validation PPL, entropy verdicts per layer,
nonlinear ops, predicted 2PC communication/latency at the demo size and at GPT-2 size, and savings. The
results (results.md/json, report.html with every figure, demo.md) are the sweep's, written into DIR.

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

from privlm.errors import PrivlmError, bounded_int
from privlm.validate import read_json
from privlm.pi.summary import CostSummary
from privlm.results import RunRow, as_rows

DEFAULT_SWEEP = "configs/sweeps/demo.yaml"
# A prompt from the training distribution (Python source); 24 tokens with the demo's 2K BPE.
DEFAULT_PROMPT = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        return"
PI_PRESET = "SM+ScFuFFN"  # the softmax-only design the private inference runs on
GPT2_T = 128  # the paper's Table 3 context length


def train_runs(sweep, out: Path, jobs: int, log=print) -> dict[str, float]:
    """Train every unfinished run of ``sweep`` under ``out`` with the sweep runner, ``jobs`` processes at a
    time (one torch thread each). Returns the wall seconds of each run trained so far."""
    from privlm.sweep import run_sweep

    state = run_sweep(sweep, out, log=log, jobs=jobs)  # a failed run raises there, naming its log
    return {name: rec["seconds"] for name, rec in state["runs"].items() if "seconds" in rec}


DEFAULT_PI_ARGS = "--spu-profile bumblebee"


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


def gpt2_costs(rows: list[RunRow], baseline_preset: str, profile: str) -> dict[str, CostSummary]:
    """Predicted 2PC cost of each row's preset at GPT-2 size (L12 H12 d768, 50K vocabulary, T=128) and its
    savings relative to the baseline preset at the same size."""
    from privlm.config import load_config
    from privlm.pi import census, predict

    def cost(preset):
        c = census(load_config(preset).model, GPT2_T)
        return CostSummary.of(c, predict(c, profile))

    ref = cost(baseline_preset)
    return {r.name: cost(r.preset).relative_to(ref) for r in as_rows(rows)}


def _fmt(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def comparison_table(rows: list[RunRow], gpt2: dict[str, CostSummary], demo_size: str) -> list[str]:
    """The demo's one table (markdown): quality, entropy verdicts, nonlinear ops, cost at both sizes."""
    rows = as_rows(rows)
    n_layers = max(len(r.diagnosis.layer_verdicts) if r.diagnosis else 0 for r in rows)
    head = (["design", "val PPL", "entropy verdict"] + [f"L{i}" for i in range(n_layers)]
            + ["#nonlinear ops", f"Comm/Lat {demo_size}", "sav.", "Comm/Lat GPT-2", "sav."])
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
        g, c = gpt2[r.name], r.cost
        demo_cost = (["–", "–"] if c is None else
                     [f"{c.comm_gb:.3f} GB / {c.lat_min:.2f} min",
                      f"{_fmt(c.comm_savings, '.2f')}× / {_fmt(c.lat_savings, '.2f')}×"])
        cells = [r.label, ppl, r.verdict or "–", *layers, "–" if c is None else c.nonlinear, *demo_cost,
                 f"{g.comm_gb:.2f} GB / {g.lat_min:.2f} min", f"{g.comm_savings:.2f}× / {g.lat_savings:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pi_line(run_label: str, doc: dict) -> str:
    agree = {True: "agrees with", False: "DIFFERS from", None: "not compared with"}[doc.get("top1_agree")]
    err = doc.get("max_logit_err")
    return (f"private next-token prediction of {run_label} under 2PC (SPU {doc['protocol']}, profile "
            f"{doc.get('spu_profile', 'default')}, {doc['mode']}, "
            f"T={doc['T']} prompt tokens): {doc.get('predicted_text', doc['predicted_token'])!r} (token "
            f"{doc['predicted_token']}), {agree} plaintext (max |logit error| "
            f"{'–' if err is None else f'{err:.4f}'}); {doc['bytes_total'] / 1e6:.1f} MB exchanged, "
            f"{doc['messages']:,} messages, {doc['wall_seconds']:.0f} s")


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of every child process waited for so far: the demo's work in core-seconds,
    which, unlike wall time, hardly depends on what else the machine is running."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_demo(sweep_path: str, out: Path, jobs: int, prompt: str, pi_args: list[str], skip_pi: bool = False,
             log=print) -> dict:
    from privlm.data import prepare_data
    from privlm.fileio import atomic_write_json, atomic_write_text
    from privlm.presets import normalize_name
    from privlm.report.analysis import DEFAULT_PROFILE
    from privlm.sweep import load_sweep, write_results

    t_start = time.time()
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

    rows = write_results(sweep, out, title="privlm demo: baseline vs softmax-only vs entropy-regularized")
    baseline_preset = next((r.preset for r in rows if sweep.baseline in (r.name, r.preset)), rows[0].preset)
    profile = next((r.cost.profile for r in rows if r.cost), DEFAULT_PROFILE)
    table = comparison_table(rows, gpt2_costs(rows, baseline_preset, profile), demo_size)
    lines = ["", f"Comparison ({tokens:,} training tokens per design; PPL on the whole validation split; per "
                 f"layer: mean head entropy in nats, verdict, difference from the baseline's layer; costs: "
                 f"predicted 2PC cost of one token after a {d.seq_len}-token prompt, profile {profile}; "
                 f"savings vs {baseline_preset}):", ""] + table
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
                                          "load_average": os.getloadavg(), "pi": pi_doc, "pi_error": pi_error})
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
    run_demo(args.sweep, out, args.jobs, args.prompt, shlex.split(args.pi_args), args.skip_pi)
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
    p.add_argument("--skip-pi", action="store_true", help="no private inference (no SPU environment needed)")
    p.set_defaults(func=run)
