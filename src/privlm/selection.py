"""Settings chosen on a held-out split: the one scorer of sweeps that select (λ, γ, ...) and the one reader of
the choice.

A selection sweep (``configs/sweeps/ereg-grid-v3.yaml``) trains its candidates with ``data.heldout_fraction``
and names what it selects::

    select:
      among: EReg(SM(t)+ScFuFFN)       # the candidates: the runs of this preset
      keys: [reg.lambda_, reg.gamma]   # what the chosen run's config hands on

`write_results` of such a sweep scores every finished run with `heldout_eval` (`privlm eval RUN --split
heldout`: files carved from the training side, never trained on and never the reported validation split) and
writes ``selection.json`` beside results.json: each run's held-out and validation PPL, the candidate with the
lowest held-out PPL, and its ``keys`` as ``overrides`` (``key=value`` strings). A study sweep reads the choice
with ``overrides_from: PATH/selection.json`` (`selection_overrides`), appended to its common overrides, so the
study cannot start before the selection is complete (every run of the selection sweep finished) and always
trains what was selected.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from privlm.errors import ConfigError
from privlm.presets import normalize_name

SELECTION_FORMAT = "privlm-selection/1"
SELECT_KEYS = {"among", "keys"}


def parse_select(raw: Any, origin: str) -> Optional[dict]:
    """A sweep file's ``select`` mapping, checked (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != SELECT_KEYS or not isinstance(raw["among"], str) \
            or not isinstance(raw["keys"], list) or not raw["keys"] \
            or not all(isinstance(k, str) and k.count(".") == 1 for k in raw["keys"]):
        raise ConfigError(f"{origin}: 'select' must be a mapping {{among: PRESET, keys: [section.key, ...]}}")
    return {"among": raw["among"], "keys": list(raw["keys"])}


def selection_overrides(path: Path, origin: str) -> list[str]:
    """The ``overrides`` of a selection.json (written by a selection sweep), checked."""
    if not path.is_file():
        raise ConfigError(f"{origin}: overrides_from '{path}' does not exist yet: run the selection sweep that "
                          f"writes it first (the command is in this sweep file's header)")
    from privlm.validate import read_json  # size-, depth- and schema-checked (SCHEMAS["selection.json"])
    try:
        doc = read_json(path, kind="selection.json", error=ConfigError)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: overrides_from: {exc}") from None
    if doc.get("format") != SELECTION_FORMAT:
        raise ConfigError(f"{origin}: overrides_from '{path}' is not a {SELECTION_FORMAT} file")
    over = doc["overrides"]
    pending = doc.get("not_finished") or []
    if pending:  # a choice among some candidates could change when the others finish: never train on it
        raise ConfigError(f"{origin}: overrides_from '{path}' is a partial selection ({len(pending)} run(s) of the "
                          f"selection sweep not finished: {', '.join(map(str, pending[:3]))}"
                          f"{', ...' if len(pending) > 3 else ''}); finish that sweep first")
    if not over or not all("=" in o for o in over):
        raise ConfigError(f"{origin}: overrides_from '{path}' has no selected overrides (nothing was selected: "
                          f"no candidate run had finished)")
    return over


def heldout_eval(out: Path, name: str) -> dict:
    """`privlm eval RUN --split heldout` of a finished run, kept in out/heldout/<name>.json beside the sweep
    (never in the run directory) with the SHA-256 of the weights it scored, so a rerun scores only new runs."""
    from privlm.evaluate import evaluate_run
    from privlm.fileio import atomic_write_json

    weights = hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest()
    cache = out / "heldout" / f"{name}.json"
    if cache.is_file():
        from privlm.errors import PrivlmError
        from privlm.validate import NUMBER, Opt, read_json
        try:  # a cache that does not read as one is scored again
            saved = read_json(cache, {"weights_sha256": str, "result": {"ppl": Opt(NUMBER), "tokens": int}},
                              error=PrivlmError)
            if saved["weights_sha256"] == weights:
                return saved["result"]
        except PrivlmError:
            pass
    res = evaluate_run(str(out / name), split="heldout", device="cpu")
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, {"weights_sha256": weights, "result": res})
    return res


def _value(cfg, key: str):
    section, field = key.split(".")
    try:
        return getattr(getattr(cfg, section), field)
    except AttributeError:
        raise ConfigError(f"select.keys: '{key}' is not a config field") from None


def select(runs: Sequence, rows: dict, out: Path, spec: dict, log=print) -> dict:
    """Score the finished ``runs`` (SweepRun) on the held-out split and choose among ``spec['among']``."""
    scored = []
    for r in runs:
        row = rows.get(r.name)
        if row is None or not row.finished:
            continue
        held = heldout_eval(out, r.name)
        scored.append({"name": r.name, "preset": r.preset, "seed": r.cfg.train.seed,
                       "candidate": normalize_name(r.preset) == normalize_name(spec["among"]),
                       "values": {k: _value(r.cfg, k) for k in spec["keys"]},
                       "heldout_ppl": held["ppl"], "heldout_tokens": held["tokens"],
                       "valid_ppl": row.ppl, "diverged": bool(row.diverged), "verdict": row.verdict})
        log(f"{r.name}: held-out PPL {held['ppl']:.3f}")
    ok = [s for s in scored if s["candidate"] and not s["diverged"] and s["heldout_ppl"] is not None
          and math.isfinite(s["heldout_ppl"])]
    best = min(ok, key=lambda s: s["heldout_ppl"]) if ok else None
    return {"format": SELECTION_FORMAT, "split": "heldout",
            "rule": f"lowest held-out PPL among the finished {spec['among']} runs",
            "keys": spec["keys"], "selected": best["name"] if best else None,
            "overrides": [f"{k}={json.dumps(v)}" for k, v in best["values"].items()] if best else [],
            "not_finished": [r.name for r in runs if r.name not in {s["name"] for s in scored}],
            "runs": scored}
