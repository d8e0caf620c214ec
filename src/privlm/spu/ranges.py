"""What trained models feed each SPU kernel: the range of each kernel's quantities per op and layer.

A plaintext torch forward with the model's hook points (privlm.model.hooks) attached: ``attn.hook_attn_scores``
(the scaled, causally masked logits the softmax receives; SM(t)'s temperatures included), ``ffn.hook_pre_act``
(the GELU's / ReLU's input), ``hook_resid_pre`` / ``hook_resid_mid`` (LN1's / LN2's input) and the last block's
``hook_resid_post`` (ln_f's input). What each kernel computes on is `privlm.spu.kernels.kernel_quantities` of
those; the range its error bound is tested on, `privlm.spu.kernels.ranges_tested`. bench/pi_kernel_ranges.py
runs it on trained runs (and the kernels under 2PC on `model_kernel_inputs`).
"""
from __future__ import annotations

import numpy as np

from privlm.opschema import MASK_VALUE
from privlm.spu.kernels import kernel_quantities, ranges_tested

BATCH = 4  # sequences per forward (the T x T logits of every layer are held at once)


def op_points(cfg) -> dict[str, tuple[str, str, str | None]]:
    """hook point -> (op, layer label, the norm module whose gains apply, for LayerNorm) of the values each
    nonlinear op of a model receives."""
    points: dict[str, tuple[str, str, str | None]] = {}
    for i in range(cfg.n_layer):
        points[f"blocks.{i}.attn.hook_attn_scores"] = ("softmax", str(i), None)
        if cfg.norm == "layernorm":
            points[f"blocks.{i}.hook_resid_pre"] = ("layernorm", f"{i}.ln_1", f"blocks.{i}.ln_1")
            points[f"blocks.{i}.hook_resid_mid"] = ("layernorm", f"{i}.ln_2", f"blocks.{i}.ln_2")
        if cfg.ffn != "fused" and cfg.activation in ("gelu", "relu"):
            points[f"blocks.{i}.ffn.hook_pre_act"] = (cfg.activation, str(i), None)
    if cfg.norm == "layernorm" and cfg.ln_f:
        points[f"blocks.{cfg.n_layer - 1}.hook_resid_post"] = ("layernorm", "ln_f", "ln_f")
    return points


class Stats:
    """Running min / max / count outside a range of one quantity, overall and per layer."""

    def __init__(self, tested: tuple[float, float] | None):
        self.tested, self.lo, self.hi, self.n, self.outside, self.layers = tested, np.inf, -np.inf, 0, 0, {}

    def add(self, layer: str, v: np.ndarray) -> None:
        lo, hi = float(v.min()), float(v.max())
        self.lo, self.hi, self.n = min(self.lo, lo), max(self.hi, hi), self.n + v.size
        if self.tested is not None:
            self.outside += int(((v < self.tested[0]) | (v > self.tested[1])).sum())
        a, b = self.layers.get(layer, (np.inf, -np.inf))
        self.layers[layer] = (min(a, lo), max(b, hi))

    def doc(self) -> dict:
        return {"min": self.lo, "max": self.hi, "values": self.n,
                "tested": None if self.tested is None else list(self.tested),
                "outside": None if self.tested is None else self.outside,
                "layers": {k: list(v) for k, v in self.layers.items()}}


def measure_model(model, ids) -> dict[str, dict[str, dict]]:
    """op -> quantity -> `Stats.doc` of what ``model`` (a privlm GPT) feeds its nonlinear ops on token ids
    [N, T] (a torch LongTensor). Observing only: the forward's outputs are not used."""
    import torch

    from privlm.model.hooks import capture

    points = op_points(model.config)
    stats: dict[str, dict[str, Stats]] = {}
    with torch.no_grad():
        for start in range(0, ids.shape[0], BATCH):
            with capture(model, lambda n: n in points) as store:
                model(ids[start:start + BATCH])
            for name, value in store.items():
                op, layer, _ = points[name]
                if op == "relu":
                    qs, tested = {"input": value.double().numpy().ravel()}, {}
                else:
                    qs, tested = kernel_quantities(op, [value.double().numpy()]), ranges_tested(op)
                for q, v in qs.items():
                    stats.setdefault(op, {}).setdefault(q, Stats(tested.get(q))).add(layer, v)
    return {op: {q: st.doc() for q, st in qs.items()} for op, qs in stats.items()}


RATIO_QUANTITIES = ("row_sum", "variance")  # positive quantities spanning decades: compared by ratio


def reach(quantity: str, lo: float, hi: float, vmin: float, vmax: float) -> float:
    """How far values in [vmin, vmax] of ``quantity`` reach beyond the tested range [lo, hi]: log2 of the ratio
    beyond an end for RATIO_QUANTITIES, the difference otherwise (the softmax's quantities: only the end that not
    every row reaches); positive outside, negative inside (the nearer an end, the higher)."""
    # ends every input reaches: z = s - rowmax is 0 at each row's maximum, sum exp(z) >= 1 is 1 in a causal first row
    if quantity == "exp_input":
        return lo - vmin
    if quantity == "row_sum":
        return np.log2(max(vmax, 1e-30) / hi)
    if quantity in RATIO_QUANTITIES:
        return max(np.log2(lo / max(vmin, 1e-30)), np.log2(max(vmax, 1e-30) / hi))
    return max(lo - vmin, vmax - hi)


def widest_layer(q: dict, quantity: str = "") -> str:
    """The layer whose values of ``quantity`` (``q``: its `Stats.doc`) reach furthest beyond the tested range (all
    inside: the nearest an end; `reach`)."""
    lo, hi = q["tested"] if q["tested"] is not None else (0.0, 0.0)
    return max(q["layers"], key=lambda k: reach(quantity, lo, hi, *q["layers"][k]))


def furthest(op_doc: dict) -> str:
    """The layer label whose values reach furthest beyond the tested range (all inside: the nearest an end), of the
    op's quantity that reaches furthest (`reach`)."""
    name, q = max(op_doc.items(), key=lambda kq: reach(kq[0], *kq[1]["tested"], kq[1]["min"], kq[1]["max"]))
    return widest_layer(q, name)


def outside_score(op: str, v: np.ndarray) -> np.ndarray:
    """Per head (softmax [H, T, T]) or row ([T, width]): how far its quantities reach beyond the tested range
    (`reach`: positive outside, negative inside, the nearer an end the higher). Model inputs for a 2PC check are
    taken from the highest first."""
    tested = ranges_tested(op)
    score = np.full(v.shape[0], -np.inf)
    for i in range(v.shape[0]):
        for q, x in kernel_quantities(op, [v[i:i + 1]]).items():
            score[i] = max(score[i], reach(q, *tested[q], float(x.min()), float(x.max())))
    return score


def model_kernel_inputs(model, ids, ops: dict[str, dict[str, dict]], max_elements: int) -> tuple[dict, dict]:
    """(arrays for `python -m privlm.spu.kernels --inputs`, op -> layer label): what ``model`` feeds softmax,
    GELU and LayerNorm in the layer of `furthest` (``ops``: `measure_model`'s), for the first sequence of
    ``ids``: whole heads (softmax, masks at MASK_VALUE) or whole rows up to ``max_elements`` values, those reaching
    furthest toward or beyond the ends of the tested range first (`outside_score`), and a
    LayerNorm's gains, bias and eps."""
    import torch

    from privlm.model.hooks import capture

    points = op_points(model.config)
    chosen = {op: furthest(ops[op]) for op in ops if op in ("softmax", "gelu", "layernorm")}
    names = {n: v for n, v in points.items() if v[0] in chosen and v[1] == chosen[v[0]]}
    with torch.no_grad(), capture(model, lambda n: n in names) as store:
        model(ids[:1])
    arrays: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    for name, (op, _, norm) in names.items():
        v = store[name][0].double().numpy()  # one sequence
        if op == "softmax":  # [H, T, T]: whole heads
            v = np.where(np.isneginf(v), MASK_VALUE, v)
            k = max(1, max_elements // (v.shape[-1] * v.shape[-2]))
        else:  # [T, width]: whole rows
            k = max(1, max_elements // v.shape[-1])
        v = v[np.sort(np.argsort(-outside_score(op, v), kind="stable")[:k])]
        arrays[f"{op}.0"] = v.astype(np.float32)
        if op == "layernorm":
            ln = modules[norm]
            arrays["layernorm.1"] = ln.weight.detach().double().numpy().astype(np.float32)
            bias = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)
            arrays["layernorm.2"] = bias.detach().double().numpy().astype(np.float32)
            arrays["layernorm.eps"] = np.asarray(ln.eps, np.float64)
    return arrays, chosen
