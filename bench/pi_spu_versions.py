"""Per-element bytes of SPU's stock kernels on the SPU version of the interpreter that runs this script.

    /tmp/spu092/bin/python bench/pi_spu_versions.py --write      # SPU 0.9.2b0 (a scratch venv, see below)
    .venv-spu/bin/python bench/pi_spu_versions.py --write         # SPU 0.9.5 (privlm's SPU environment)

The paper's engine was SPU before October 2024 (docs/DECISIONS.md#spu-profiles-named-for-what-they-are). This
measures the `paper-era` kernels — jax.nn.gelu (tanh), the clipped-exp softmax with one reciprocal per row,
flax's LayerNorm with secret gains, ReLU — with both parties in one process (SPU's simulator, CHEETAH, FM64,
18 fraction bits, exact products), every input secret-shared as SPU's Flax examples held them. Each kernel
runs at two sizes and the per-element cost is the difference of SPU's link counters over the difference of
elements (the one-time setup cancels). Results go to bench/results/pi_spu_versions.json, one entry per SPU
version; docs/pi-measured.md shows them beside the issue's reference figures.

The scratch environment for 0.9.2b0 (not part of `make test`; python3.11):
    python3.11 -m venv /tmp/spu092 && /tmp/spu092/bin/pip install spu==0.9.2b0 "numpy<2" "ml-dtypes<0.5"
Its configuration API is the protobuf `spu.spu_pb2.RuntimeConfig` (0.9.5: `spu.libspu.RuntimeConfig`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "bench" / "results" / "pi_spu_versions.json"
# the paper-fit's and the 0.9.2b0 figures the issue quotes (bytes per element, both directions)
REFERENCE_092 = {"gelu": 3462, "softmax": 1630, "layernorm": 848, "relu": 98.5}


def runtime_config(log: bool):
    import spu

    doc = {"protocol": "CHEETAH", "field": "FM64", "fxp_fraction_bits": 18, "enable_pphlo_profile": log}
    try:
        import spu.libspu as libspu
        cfg = libspu.RuntimeConfig()  # 0.9.5
        assert cfg.ParseFromJsonString(json.dumps(doc))
        return cfg
    except AttributeError:  # 0.9.2b0: protobuf messages
        from google.protobuf import json_format

        import spu.spu_pb2 as pb
        doc["protocol"], doc["field"] = "CHEETAH", "FM64"
        return json_format.ParseDict(doc, pb.RuntimeConfig())
    finally:
        del spu


def kernels():
    import functools

    from privlm.spu import kernels as K
    return {"gelu": (K.gelu_tanh, lambda n: [np.random.default_rng(0).uniform(-8, 8, (n // 1024, 1024))]),
            "softmax": (K.softmax_clipped, lambda n: [np.random.default_rng(0).normal(0, 3, (n // 16384, 128, 128))]),
            "layernorm": (functools.partial(K.layer_norm_stock, eps=1e-5),
                          lambda n: [np.random.default_rng(0).normal(0, 2, (n // 128, 128)),
                                     np.ones(128) * 1.1, np.zeros(128) + 0.1]),
            "relu": (K.relu_compare, lambda n: [np.random.default_rng(0).normal(0, 2, (n // 1024, 1024))])}


def measure(sizes=(16384, 32768)) -> dict:
    import spu
    import spu.libspu as libspu
    import spu.utils.simulation as spsim

    import re

    # 0.9.2b0's line lacks 0.9.5's "recv actions"; only one party of the simulator logs it
    link = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+)")

    log = Path(tempfile.mkdtemp(prefix="privlm-spuver-")) / "spu.log"
    opts = libspu.logging.LogOptions()
    opts.enable_console_logger = False
    opts.system_log_path = str(log)
    libspu.logging.setup_logging(opts)
    sim = spsim.Simulator(2, runtime_config(True))
    out = {}
    for op, (fn, inputs) in kernels().items():
        totals = []
        for n in sizes:
            before = log.read_text() if log.exists() else ""
            spsim.sim_jax(sim, fn)(*[a.astype(np.float32) for a in inputs(n)])
            for _ in range(600):  # the logger writes in the background
                lines = link.findall((log.read_text() if log.exists() else "")[len(before):])
                if lines:
                    break
                time.sleep(0.05)
            totals.append(max(int(a) + int(b) for a, b in lines))  # a party's send + recv: both directions
        out[op] = {"bytes_per_element": (totals[1] - totals[0]) / (sizes[1] - sizes[0]), "elements": list(sizes),
                   "bytes": totals}
    return {"spu_version": spu.__version__, "settings": "CHEETAH FM64/18, exact products, inputs and gains secret",
            "kernels": "jax.nn.gelu tanh | clipped exp x one reciprocal per row | flax LayerNorm | relu",
            "date": time.strftime("%Y-%m-%d"), "ops": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"merge into {OUT.relative_to(ROOT)}")
    args = ap.parse_args()
    doc = measure()
    print(json.dumps(doc, indent=1))
    if args.write:
        old = json.loads(OUT.read_text()) if OUT.exists() else {"reference_0.9.2b0": REFERENCE_092, "versions": {}}
        old["versions"][doc["spu_version"]] = doc
        OUT.write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
