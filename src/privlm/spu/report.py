"""Turn a party-0 result (per-step link counters) into the numbers `privlm pi run` reports.

Runs in the main environment. Every step carries the census entry it is charged to, so the measured
breakdown lines up with `privlm.pi.census` op by op (softmax/layernorm/activation elements, ffn/attention/
embedding/head FLOPs) and with a cost profile's prediction.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from privlm.opschema import CALIBRATED_OPS, FLOP_ENTRIES, STEP_KINDS
from privlm.spu.linkstats import LinkStats


def _stats(row: dict) -> LinkStats:
    return LinkStats(row.get("send_bytes", 0), row.get("recv_bytes", 0), row.get("send_actions", 0),
                     row.get("recv_actions", 0))


def breakdown(steps: list[dict], key: str) -> dict[str, dict]:
    """Sum bytes, messages, seconds, elements and FLOPs of the steps grouped by ``key`` (kind | census)."""
    out: dict[str, dict] = {}
    for s in steps:
        acc = out.setdefault(s[key], {"bytes": 0, "send_bytes": 0, "recv_bytes": 0, "messages": 0,
                                      "seconds": 0.0, "elements": 0, "flops": 0, "runs": 0})
        st = _stats(s)
        acc["bytes"] += st.bytes
        acc["send_bytes"] += st.send_bytes
        acc["recv_bytes"] += st.recv_bytes
        acc["messages"] += st.messages
        acc["seconds"] += s["seconds"]
        acc["elements"] += s["elements"]
        acc["flops"] += s["flops"]
        acc["runs"] += 1
    return out


def summarize(result: dict, logits: np.ndarray, ref_logits: Optional[np.ndarray], census=None) -> dict:
    """The `privlm pi run --json` document."""
    steps = result["steps"]
    total = LinkStats()
    for s in steps:
        total = total + _stats(s)
    share_online = result["input_share_bytes"] + result["output_share_bytes"]
    # party 0 sends its runtime traffic plus the one-hot share; party 1 sends the rest and its logits share
    p0_sent = total.send_bytes + result["input_share_bytes"]
    p1_sent = total.recv_bytes + result["output_share_bytes"]
    doc = {
        "protocol": result["protocol"], "mode": result["mode"], "T": result["T"],
        "spu_version": result["spu_version"], "spu_profile": result["spu_profile"],
        "spu_settings": result["spu_settings"],
        "predicted_token": int(np.argmax(logits[-1])),
        "bytes_total": total.bytes + share_online,
        "bytes_per_party": {"party0_sent": p0_sent, "party1_sent": p1_sent},
        "bytes_online_excluding_setup": total.bytes + share_online - breakdown(steps, "kind")["setup"]["bytes"],
        # the weights are private to the server and the prompt to the client: nothing is shared up front
        "input_share_bytes": result["input_share_bytes"],
        "messages": total.messages,
        "wall_seconds": result["wall_seconds"], "online_seconds": result["online_seconds"],
        "compile_seconds": result["compile_seconds"], "peak_rss_mb": result.get("peak_rss_mb"),
        "ops": breakdown(steps, "kind"),
        "census_ops": breakdown(steps, "census"),
    }
    if ref_logits is not None:
        ref = np.asarray(ref_logits, dtype=np.float64)[-logits.shape[0]:]
        doc["plaintext_token"] = int(np.argmax(ref[-1]))
        doc["top1_agree"] = doc["predicted_token"] == doc["plaintext_token"]
        doc["top1_agree_all_positions"] = float(np.mean(np.argmax(ref, -1) == np.argmax(logits, -1)))
        doc["max_logit_err"] = float(np.max(np.abs(ref - logits)))
    else:
        doc.update(plaintext_token=None, top1_agree=None, max_logit_err=None)
    if census is not None:
        doc["census_check"] = census_check(doc["census_ops"], census)
    return doc


def census_check(measured: dict[str, dict], census) -> dict[str, dict]:
    """Elements / FLOPs the 2PC program evaluated beside what `privlm.pi.census` counts for the model."""
    out = {}
    for op in CALIBRATED_OPS:
        want = census.elements(op)
        got = measured.get(op, {}).get("elements", 0)
        if want or got:
            out[op] = {"program": got, "census": want}
    for key in FLOP_ENTRIES:
        want = census.flops.get(key, 0)
        got = measured.get(key, {}).get("flops", 0)
        if want or got:
            out[key] = {"program": got, "census": want}
    return out


def format_table(doc: dict) -> str:
    lines = []
    if doc.get("top1_agree") is not None:
        lines.append(f"next token: {doc['predicted_token']} ({doc.get('predicted_text', '')!r}); plaintext "
                     f"{doc['plaintext_token']}; top-1 agree: {doc['top1_agree']}; "
                     f"max |logit error|: {doc['max_logit_err']:.2e}")
    else:
        lines.append(f"next token: {doc['predicted_token']} ({doc.get('predicted_text', '')!r})")
    mb = 1e6
    lines.append(f"protocol {doc['protocol']} ({doc['mode']}), SPU profile {doc['spu_profile']}, T={doc['T']}, "
                 f"SPU {doc['spu_version']}: "
                 f"{doc['bytes_total'] / mb:.2f} MB total (party 0 sent {doc['bytes_per_party']['party0_sent'] / mb:.2f}"
                 f" MB, party 1 sent {doc['bytes_per_party']['party1_sent'] / mb:.2f} MB), "
                 f"{doc['messages']} messages, online {doc['online_seconds']:.1f} s, wall {doc['wall_seconds']:.1f} s")
    lines.append("weights private to the server, prompt private to the client: no input shares are sent")
    lines.append(f"{'op':<12}{'MB':>10}{'share':>8}{'messages':>10}{'seconds':>10}{'elements':>11}{'GFLOP':>9}")
    total = max(doc["bytes_total"], 1)
    for kind in STEP_KINDS:
        if kind not in doc["ops"]:
            continue
        r = doc["ops"][kind]
        lines.append(f"{kind:<12}{r['bytes'] / mb:>10.2f}{100 * r['bytes'] / total:>7.1f}%{r['messages']:>10}"
                     f"{r['seconds']:>10.2f}{r['elements']:>11}{r['flops'] / 1e9:>9.4f}")
    if "census_check" in doc:
        lines.append("census mapping (program vs privlm.pi.census): " + ", ".join(
            f"{k} {v['program']}/{v['census']}" for k, v in doc["census_check"].items()))
    return "\n".join(lines)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def accuracy_under_2pc(ref_logits: np.ndarray, logits: np.ndarray, ids: np.ndarray) -> dict:
    """`privlm pi eval`'s numbers for N sequences: ref_logits/logits [N, T, V] (plaintext, 2PC), ids [N, T].

    top1_agreement: share of all N*T positions whose argmax agrees; logit errors over every logit;
    ppl_plain / ppl_2pc: exp of the mean next-token cross-entropy over the N*(T-1) positions that have a
    target (as `privlm eval` scores T-token chunks), from each set of logits; None when T is 1 (only the last
    position's logits were revealed).
    disagreements / max_disagreement_margin: positions whose argmax differs, and the largest plaintext logit
    gap between the plaintext's top-1 and the 2PC's top-1 among them. A gap below twice the logit error is a
    near-tie that the 2PC error can flip; a larger one is a real failure."""
    ref = np.asarray(ref_logits, np.float64)
    got = np.asarray(logits, np.float64)
    ids = np.asarray(ids)
    if ref.shape != got.shape or ref.shape[:2] != ids.shape:
        raise ValueError(f"shape mismatch: plaintext {ref.shape}, 2PC {got.shape}, ids {ids.shape}")
    targets = ids[:, 1:]

    def ppl(lg: np.ndarray) -> float:
        lp = np.take_along_axis(log_softmax(lg[:, :-1]), targets[..., None], axis=-1)
        return float(np.exp(-lp.mean()))
    err = np.abs(ref - got)
    if targets.size == 0:  # one position per sequence (pi eval without --all-positions): no target to score
        p_plain = p_2pc = None
    else:
        p_plain, p_2pc = ppl(ref), ppl(got)
    top_plain, top_2pc = ref.argmax(-1), got.argmax(-1)
    differ = top_plain != top_2pc
    margins = (np.take_along_axis(ref, top_plain[..., None], -1) - np.take_along_axis(ref, top_2pc[..., None], -1))[..., 0]
    return {"positions": int(ids.size), "predicted_positions": int(targets.size),
            "top1_agreement": float(np.mean(~differ)), "disagreements": int(differ.sum()),
            "max_disagreement_margin": float(margins[differ].max()) if differ.any() else 0.0,
            "mean_logit_err": float(err.mean()), "max_logit_err": float(err.max()),
            "ppl_plain": p_plain, "ppl_2pc": p_2pc, "ppl_rel_diff": None if p_plain is None else p_2pc / p_plain - 1.0}
