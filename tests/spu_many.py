"""Several traced programs in one 2PC simulator session, for the tests (SPU environment: numpy, jax, spu).

    python tests/spu_many.py OUT.json PROTOCOL DIR [DIR ...]

Each DIR holds a traced export (program.json, public.safetensors, server.safetensors) and prompts.json (a list of
equally long prompts); every program must have the same T and vocabulary. The programs' steps are run one after
the other in one session (one protocol setup, one process), each model's tensors under its own prefix and the
server's tensors private to the server as in `privlm.spu.party`; a last step gathers every model's logits. OUT.json
gets, per DIR, the census entries of its steps; OUT.npy the logits [prompts, models, T, V].
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from privlm.spu.party import make_link, run_party, run_ranks
from privlm.spu.program import Program, Step, load_trace, load_weights, one_hot, program_from_trace
from privlm.spu.spu_profile import load_spu_profile


def main(out: str, protocol: str, dirs: list[str]) -> int:
    profile = load_spu_profile("default")
    steps, shapes, weights, outputs, census = [], {}, {}, [], {}
    T = V = None
    for i, d in enumerate(map(Path, dirs)):
        doc, consts = load_trace(d)
        prog = program_from_trace(doc, consts, head="all", kernels=profile.kernels)
        T, V = prog.T, doc["vocab_size"]

        def rename(n: str, _p=f"m{i}/") -> str:
            return n if n == "onehot" else "server:" + _p + n[7:] if n.startswith("server:") else _p + n
        steps += [Step(f"m{i}/{s.name}", s.kind, s.census, s.fn, tuple(map(rename, s.inputs)),
                       tuple(map(rename, s.outputs)), s.elements, s.flops, s.layer) for s in prog.steps]
        shapes.update({rename(k): v for k, v in prog.input_shapes.items()})
        weights.update({f"m{i}/{k}": v for k, v in load_weights(d / "server.safetensors").items()})
        outputs.append(rename(prog.output))
        census[str(d)] = sorted({s.census for s in prog.steps})
    steps.append(Step("gather", "head", "lm_head", lambda *xs: jnp.stack(xs), tuple(outputs), ("logits",)))
    server = tuple(sorted(n for n in shapes if n.startswith("server:")))
    program = Program(meta={"vocab_size": V}, T=T, steps=steps, server_inputs=server, output="logits",
                      input_shapes=shapes)
    prompts = json.loads((Path(dirs[0]) / "prompts.json").read_text())
    onehots = [one_hot(np.asarray(p), V) for p in prompts]
    result: dict = {}

    def play(rank: int) -> None:
        res = run_party(rank, make_link(rank, None), program, protocol, profile, None,
                        onehots if rank == 0 else None, weights if rank == 1 else None, len(prompts))
        if res is not None:
            result.update(res)
    run_ranks(play, (0, 1))
    logits = np.asarray(result["logits"]).reshape(len(prompts), len(dirs), T, V)
    np.save(Path(out).with_suffix(".npy"), logits)
    Path(out).write_text(json.dumps({"census": census, "protocol": result["protocol"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
