"""`privlm pi generate`: private text generation under 2PC with a secret-shared key/value cache.

    privlm pi generate MODEL --prompt TEXT --max-new-tokens N [--greedy | --temperature T --top-k K --seed S]
                       [--mode sim|2proc] [--party 0|1 --peer A --peer B] [--spu-profile P] [--wan RATE:DELAY] [--json]
    privlm pi export MODEL OUT --T P --max-new-tokens N            # then, on two machines:
    privlm pi generate OUT/server --mode 2proc --party 1 --max-new-tokens N --peer A --peer B
    privlm pi generate OUT/client --mode 2proc --party 0 --prompt TEXT --max-new-tokens N --peer A --peer B

Runs in the main environment: traces the prefill and decode programs (`privlm.generate_trace`) or takes them from
an export, launches the two parties (`privlm.spu.generate`) and reports per new token the bytes, messages, party
0's send actions and online seconds. docs/pi-measured.md#private-generation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
from pathlib import Path
from typing import Optional

from privlm.errors import MAX_T, CheckpointError, PrivlmError, bounded_float, bounded_int, seed_int
from privlm.proc import private_tempdir
from privlm.spu.spu_profile import add_spu_profile_arg, check_spu_profile


def register(sub) -> None:
    from privlm.spu.cli_inputs import add_peer_timeout_arg

    g = sub.add_parser("generate", help="private text generation (prefill + decode steps, KV cache kept in shares)",
                       description=__doc__.splitlines()[0])
    g.add_argument("run_dir", help="RUN_DIR, a Hugging Face GPT-2, GPT-NeoX or LLaMA-family model (save_pretrained "
                                   "directory or hf:<id>), or one half of `privlm pi export --max-new-tokens`: client/ "
                                   "with --party 0 (no weights), server/ with --party 1")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    src.add_argument("--tokens", help="comma-separated token ids instead of a prompt")
    g.add_argument("--max-new-tokens", type=int, default=16, help="new tokens N (>= 1; prompt + N <= positions)")
    choice = g.add_mutually_exclusive_group()
    choice.add_argument("--greedy", action="store_true",
                        help="argmax under 2PC, only the token id revealed to the client (default)")
    choice.add_argument("--temperature", type=bounded_float(1e-4, 1e4),
                        help="sample: each step's logits are revealed to the client, who samples")
    g.add_argument("--top-k", type=bounded_int(1, 2**31 - 1), default=None, help="sampling: keep the top K logits")
    g.add_argument("--seed", type=seed_int, default=0, help="sampling: the client's random seed")
    g.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    add_spu_profile_arg(g)
    g.add_argument("--mode", default="sim", choices=("sim", "2proc"))
    g.add_argument("--peer", action="append", metavar="HOST:PORT")
    g.add_argument("--party", type=int, choices=(0, 1))
    add_peer_timeout_arg(g)
    g.add_argument("--T", type=bounded_int(1, MAX_T), help="prompt length, for --party 1 (the server) with a model "
                                                             "(an export's server/ knows it)")
    g.add_argument("--wan", metavar="RATE:DELAY", help="2proc only: emulated WAN, e.g. 100mbit:80ms (needs root)")
    g.add_argument("--keep", metavar="DIR", help="keep the exported programs, logs and audits in DIR")
    g.add_argument("--json", action="store_true", help="print one JSON document")
    g.set_defaults(func=cmd_generate)


def run_generate_parties(work: Path, export: Path, *, prompt: Optional[list[int]], P: int, new: int,
                         sample: Optional[str], protocol: str, mode: str, spu_profile: str,
                         peers: Optional[list[str]] = None, party: Optional[int] = None, wan=None,
                         peer_timeout: float = 60.0, delete_weights: bool = False,
                         timeout: Optional[float] = None) -> Optional[dict]:
    """Run `privlm.spu.generate` as the in-process simulator or two processes (as `launcher.run_parties`)."""
    from privlm.spu.launcher import check_peers, free_ports, spu_module, start_spu, supervise
    from privlm.spu.party import SIM_NAME, party_name

    out, ids = work / "generate.json", work / "ids.json"
    common = ["--export", str(export), "--new", str(new), "--protocol", protocol, "--spu-profile", spu_profile]
    if sample is not None:
        common.append("--reveal-logits")
    drop = ["--delete-weights"] if delete_weights else []
    client = ["--tokens", str(ids)] + (["--sample", sample] if sample is not None else [])
    if mode == "sim":
        ids.write_text(json.dumps(prompt))
        spu_module("privlm.spu.generate", ["--sim", *common, *client, "--weights-dir", str(export), *drop,
                                           "--out", str(out), "--log", str(work / "spu_sim.log"),
                                           "--audit", str(work / "audit_sim.json")], work, timeout, SIM_NAME)
        return json.loads(out.read_text())
    prefix: dict[int, list[str]] = {0: [], 1: []}
    if wan is None:
        peers = peers or [f"127.0.0.1:{p}" for p in free_ports(2)]
        peers_of = {0: check_peers(peers), 1: peers}
    else:
        p0, p1, x0, x1 = free_ports(4)
        peers_of = {0: [f"{wan.addresses[0]}:{p0}", f"127.0.0.1:{x1}"],
                    1: [f"127.0.0.1:{x0}", f"{wan.addresses[1]}:{p1}"]}
        prefix = {r: wan.prefix(r) for r in (0, 1)}
    cmds: dict[int, list[str]] = {}
    if party in (None, 1):
        cmds[1] = ["--rank", "1", *common, "--peers", ",".join(peers_of[1]), "--weights-dir", str(export), *drop,
                   "--P", str(P), "--peer-timeout", str(peer_timeout), "--log", str(work / "spu_party1.log"),
                   "--audit", str(work / "audit_party1.json")]
    if party in (None, 0):
        ids.write_text(json.dumps(prompt))
        cmds[0] = ["--rank", "0", *common, *client, "--peers", ",".join(peers_of[0]), "--out", str(out),
                   "--peer-timeout", str(peer_timeout), "--log", str(work / "spu_party0.log"),
                   "--audit", str(work / "audit_party0.json")]
    children: dict[str, tuple[subprocess.Popen, Path]] = {}
    daemons: dict[str, tuple[subprocess.Popen, Path]] = {}
    from privlm.proc import stop
    try:
        if wan is not None:
            daemons = {f"the delay proxy of party {side}'s namespace": (wan.delay_proxy(side, x, p), work / "-")
                       for side, x, p in ((1, x0, p0), (0, x1, p1))}
        for r, a in sorted(cmds.items(), reverse=True):
            err = work / f"spu_party{r}.stderr"
            children[party_name(r)] = (start_spu("privlm.spu.generate", a, err, prefix[r]), err)
    except BaseException:
        stop(p for p, _ in [*children.values(), *daemons.values()])
        raise
    supervise(children, timeout, daemons)
    return json.loads(out.read_text()) if 0 in cmds else None


def plaintext_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Plaintext greedy continuation: `GPT.generate(temperature=0)` (what `privlm sample --temperature 0` runs) or
    Hugging Face `generate(do_sample=False)`."""
    import torch

    idx = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        if hasattr(model.config, "model_type"):
            # eos_token_id=None: N tokens whatever they are (min_new_tokens would instead forbid the EOS token)
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        else:
            out = model.generate(idx, new, temperature=0)
    return out[0, len(prompt):].tolist()


def summarize(result: dict) -> dict:
    """Per-token rows (bytes, messages, send actions, online seconds) and totals; decode averages apart."""
    rows = []
    for t in result["per_token"]:
        row = {k: t[k] for k in ("index", "position", "token", "program", "bytes", "messages", "send_actions",
                                 "online_seconds", "reveal_bytes")}
        choice = [s for s in t["steps"] if s["program"] == "choose"]  # the argmax run (greedy)
        row["token_choice"] = {"bytes": sum(s.get("bytes", 0) for s in choice) + t["reveal_bytes"],
                               "messages": sum(s.get("messages", 0) for s in choice),
                               "send_actions": sum(s.get("send_actions", 0) for s in choice)}
        rows.append(row)
    decode = [r for r in rows if r["program"] == "decode"]
    avg = (lambda key: sum(r[key] for r in decode) / len(decode)) if decode else (lambda key: None)
    return {"per_token": rows,
            "totals": {"bytes": sum(r["bytes"] for r in rows), "messages": sum(r["messages"] for r in rows),
                       "send_actions": sum(r["send_actions"] for r in rows),
                       "online_seconds": result["online_seconds"], "setup_bytes": result["setup"].get("bytes", 0),
                       "compile_seconds": result["compile_seconds"], "wall_seconds": result["wall_seconds"]},
            "decode_per_token": {"bytes": avg("bytes"), "messages": avg("messages"),
                                 "send_actions": avg("send_actions"), "online_seconds": avg("online_seconds")}}


def cmd_generate(args) -> int:
    from privlm.hfmodel import is_hf_spec
    from privlm.spu.cli_inputs import (bundle_tokenizer, export_kind, generation_shapes, is_server_half,
                                       load_for_2pc, prompt_tokens)
    from privlm.validate import check_text

    if args.prompt is not None:
        check_text(args.prompt, "--prompt", PrivlmError)
    check_spu_profile(args.spu_profile)
    N = args.max_new_tokens
    if N <= 0:
        raise PrivlmError(f"--max-new-tokens={N} must be >= 1")
    sampling = args.temperature is not None
    if not sampling and (args.top_k is not None):
        raise PrivlmError("--top-k needs --temperature (sampling); greedy takes the argmax under 2PC")
    if args.peer is not None and args.mode != "2proc":
        raise PrivlmError("--peer needs --mode 2proc")
    if args.party is not None and args.mode != "2proc":
        raise PrivlmError("--party needs --mode 2proc")
    if args.peer is not None:
        from privlm.spu.launcher import check_peers
        check_peers(args.peer)
    link = None
    if args.wan is not None:
        from privlm.spu.wan import WanLink, check_available
        if args.mode != "2proc" or args.party is not None or args.peer is not None:
            raise PrivlmError("--wan needs --mode 2proc with both parties on this machine (no --party, no --peer)")
        link = WanLink.parse(args.wan)
        check_available()
    hf = is_hf_spec(args.run_dir)
    if not hf and not Path(args.run_dir).is_dir():
        raise CheckpointError(f"run directory '{args.run_dir}' does not exist")
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        raise PrivlmError(f"--keep directory '{args.keep}' exists and is not empty; choose a new one")
    if args.party != 1 and args.prompt is None and args.tokens is None:
        raise PrivlmError("give --prompt or --tokens (only the server, --party 1, runs without one)")
    kind = None if hf else export_kind(Path(args.run_dir))
    if kind == "run":
        raise PrivlmError(f"'{args.run_dir}' is an export for `privlm pi run` (one program); `pi generate` needs a "
                          f"model or an export made with --max-new-tokens")
    bundle = Path(args.run_dir) if kind == "generate" else None
    model = None
    if bundle is not None:  # an export: the programs are there (and, in server/, the server's tensors)
        side = 1 if is_server_half(bundle) else 0
        if args.party != side:
            raise PrivlmError(f"'{bundle}' is the {('client', 'server')[side]} half of a generation export: run it "
                              f"with --mode 2proc --party {side}")
        P_export, C_export, vocab = generation_shapes(bundle)
        tok, positions = (bundle_tokenizer(bundle) if side == 0 else None), None
    else:
        model, tok, vocab, positions, _ = load_for_2pc(args.run_dir, args.T or 1)
    if args.party == 1:
        if bundle is None and args.T is None:
            raise PrivlmError("--party 1 (server) needs --T, the public prompt length")
        prompt, P = None, args.T or P_export
    else:
        prompt = prompt_tokens(args, tok, vocab)
        P = len(prompt)
    if bundle is not None:
        if P != P_export:
            raise PrivlmError(f"the prompt has {P} tokens but the export's programs were made for {P_export} "
                              f"(privlm pi export --T)")
        if N > C_export - P_export + 1:
            raise PrivlmError(f"--max-new-tokens={N} is more than the {C_export - P_export + 1} the export was made "
                              f"for (privlm pi export --max-new-tokens)")
    if positions is not None and P + N > positions:
        raise PrivlmError(f"the prompt's {P} tokens + --max-new-tokens={N} need {P + N} positions; the model "
                          f"has {positions}")
    if model is not None:
        from privlm.generate_trace import check_supported
        check_supported(model)
    sample = f"{args.temperature},{args.top_k or ''},{args.seed}" if sampling else None
    with contextlib.nullcontext(Path(args.keep)) if args.keep else private_tempdir("privlm-pi-gen-") as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        export = bundle
        if export is None:  # traced here into the work directory (the server's tensors removed once loaded)
            from privlm.generate_trace import save_generation, trace_generation
            export = work / "export"
            save_generation(trace_generation(model, P, P + N - 1), export)

        def launch(net=None):
            return run_generate_parties(work, export, prompt=prompt, P=P, new=N, sample=sample,
                                        protocol=args.protocol, mode=args.mode, spu_profile=args.spu_profile,
                                        peers=args.peer, party=args.party, wan=net, peer_timeout=args.peer_timeout,
                                        delete_weights=bundle is None and not args.keep)
        if link is not None:
            from privlm.spu.wan import wan_namespaces
            with wan_namespaces(link) as net:
                result = launch(net)
        else:
            result = launch()
    if result is None:
        print(f"party 1 (server) finished; prompt {P} tokens, {N} new, SPU profile {args.spu_profile}")
        return 0
    new = result["new_tokens"]
    doc = {"run": args.run_dir, "protocol": result["protocol"], "mode": result["mode"],
           "spu_profile": result["spu_profile"], "spu_version": result["spu_version"], "prompt_len": P,
           "capacity": result["C"], "greedy": not sampling, "prompt_tokens": prompt, "new_tokens": new,
           "text": tok.decode(prompt + new) if tok is not None else None,
           "new_text": tok.decode(new) if tok is not None else None,
           "revealed_to_client": "token ids" if not sampling else "logits of every step",
           **summarize(result)}
    if not sampling and model is not None:  # a client bundle holds no weights: no plaintext reference there
        ref = plaintext_greedy(model, prompt, N)
        doc["plaintext_tokens"] = ref
        doc["agree"] = ref == new
    if link is not None:
        per = doc["decode_per_token"]
        doc["wan"] = {**link.to_dict(), "measured_seconds_per_token": per["online_seconds"],
                      "estimate_seconds_per_token": None if per["bytes"] is None else
                      per["bytes"] * 8 / link.bits_per_second + per["send_actions"] * link.delay_ms / 1000.0,
                      "estimate": "bytes / rate + party 0's send actions x one-way delay (send actions bound the "
                                  "message flights from above)"}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{doc['run']}: {N} new tokens after a {P}-token prompt under {doc['protocol'].upper()} "
          f"({doc['mode']}, SPU profile {doc['spu_profile']}; revealed to the client: {doc['revealed_to_client']})")
    if doc["text"] is not None:
        print(f"  text: {doc['text']!r}")
    print(f"  new tokens: {new}" + ("" if "agree" not in doc else
                                    f"  (plaintext greedy {'agrees' if doc['agree'] else 'differs: ' + str(ref)})"))
    print(f"  {'token':>5} {'pos':>4} {'program':>8} {'MB':>9} {'messages':>9} {'sends(p0)':>9} {'online s':>9}")
    for r in doc["per_token"]:
        print(f"  {r['index']:>5} {r['position']:>4} {r['program']:>8} {r['bytes'] / 1e6:>9.2f} {r['messages']:>9} "
              f"{r['send_actions']:>9} {r['online_seconds']:>9.2f}")
    t = doc["totals"]
    print(f"  total {t['bytes'] / 1e6:.2f} MB, {t['messages']} messages, online {t['online_seconds']:.1f} s "
          f"(compile {t['compile_seconds']:.1f} s once for both programs; setup {t['setup_bytes'] / 1e6:.2f} MB)")
    if link is not None:
        w = doc["wan"]
        print(f"  WAN {w['rate']}, {w['one_way_delay_ms']:g} ms: {w['measured_seconds_per_token']:.2f} s per decoded "
              f"token measured, {w['estimate_seconds_per_token']:.2f} s estimated")
    return 0
