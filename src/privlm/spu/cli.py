"""`privlm pi`: measured private inference of a privlm model or a Hugging Face causal LM under SecretFlow SPU (2PC).

    privlm pi run RUN_DIR --prompt "def f(x):" [--protocol cheetah|semi2k] [--mode sim|2proc] [--head last|all]
    privlm pi run RUN_DIR --mode 2proc --party 1 --T 8 --peer HOST0:PORT --peer HOST1:PORT      (server)
    privlm pi run CLIENT_DIR --prompt "..." --mode 2proc --party 0 --peer ... --peer ...        (client)
    privlm pi eval RUN_DIR|HF_MODEL [--sequences 2] [--all-positions]
    privlm pi export RUN_DIR OUT_DIR --T 8    # program.json + public.safetensors + tokenizer.json (client),
                                              # server.safetensors (server)
    privlm pi export RUN_DIR OUT_DIR --T 8 --max-new-tokens 16   # the same for `pi generate`: prefill/ + decode/
    privlm pi calibrate [--out PROFILE.json] [--quick]
    privlm pi measure PRESET [key=value ...] [--layers-measured 1] [--T 128]
    privlm pi measure HF_MODEL [--layers-measured 1] [--T 128]   # a config.json is enough: random weights

The parties run in the SPU environment (``make spu-setup``); this process only exports, launches and
reports. Every model runs as the program traced from its torch graph (`privlm.trace`, `privlm.spu.program`).
See docs/pi-measured.md.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from privlm.errors import MAX_T, CheckpointError, PrivlmError, bounded_int
from privlm.proc import private_tempdir
from privlm.opschema import TRACE_FILE
from privlm.validate import check_text, read_json
from privlm.spu.spu_profile import add_spu_profile_arg, check_spu_profile
from privlm.spu.cli_inputs import (add_peer_timeout_arg, bundle_tokenizer, copy_public, export_kind,  # noqa: F401
                                   check_2pc_memory as _check_2pc_memory, load_for_2pc as _load,
                                   prompt_tokens as _tokens)


def register(subparsers) -> None:
    p = subparsers.add_parser("pi", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="pi_command", metavar="PI_COMMAND", required=True)

    r = sub.add_parser("run", help="private next-token prediction of a run directory's model")
    r.add_argument("run_dir", help="RUN_DIR (config.yaml + model.safetensors), a Hugging Face save_pretrained "
                                   "directory or hf:<id> (GPT-2, GPT-NeoX, LLaMA, Qwen2, Mistral), or a client bundle "
                                   "of `privlm pi export` (program.json + public.safetensors [+ tokenizer.json]) with "
                                   "--party 0")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (tokenized with the run's tokenizer.json)")
    src.add_argument("--tokens", help="comma-separated token ids instead of a prompt")
    r.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    add_spu_profile_arg(r)
    r.add_argument("--mode", default="sim", choices=("sim", "2proc"),
                   help="sim: both parties in one SPU process; 2proc: two OS processes over brpc")
    r.add_argument("--peer", action="append", metavar="HOST:PORT",
                   help="address of party 0, then of party 1 (2proc; default two free loopback ports)")
    r.add_argument("--party", type=int, choices=(0, 1),
                   help="2proc on two machines: run only this party (0 = client, 1 = server)")
    add_peer_timeout_arg(r)
    r.add_argument("--T", type=bounded_int(1, MAX_T),
                   help="prompt length, for --party 1 (the server never sees the prompt)")
    r.add_argument("--wan", metavar="RATE:DELAY",
                   help="2proc only: run the parties in two network namespaces joined by a veth pair limited to "
                        "RATE (tc tbf) with DELAY one-way per message flight (delay proxy), e.g. 100mbit:80ms; "
                        "needs root")
    r.add_argument("--head", default="last", choices=("all", "last"),
                   help="which logits the client receives: the last position's (default: the next token) or every "
                        "position's (the census/paper workload, with the census check; reveals more)")
    r.add_argument("--chunks", type=bounded_int(1, 4096), default=1,
                   help="run each softmax, activation and gate product as this many SPU runs (bounds memory; "
                        "same math)")
    r.add_argument("--matmul-block", type=bounded_int(1, 2**20), default=None,
                   help="split every product into blocks of at most this many features (bounds memory)")
    r.add_argument("--keep", metavar="DIR", help="keep the exported files, logs and audits in DIR")
    r.add_argument("--json", action="store_true", help="print one JSON document")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("eval", help="accuracy under 2PC: validation sequences through SPU vs plaintext",
                       description="Runs N validation sequences through 2PC (one session) and reports top-1 "
                                   "agreement with the plaintext model and the mean and max logit error; by default "
                                   "the client receives only the last position's logits of each sequence. "
                                   "--all-positions reveals every position's logits, which the perplexity of the "
                                   "2PC logits (beside the plaintext one) needs.")
    v.add_argument("run_dir", help="RUN_DIR (its validation split), a Hugging Face save_pretrained directory or "
                                   "hf:<id> (text tokenized with its own tokenizer: the standard library's "
                                   "validation split, or --data)")
    add_spu_profile_arg(v)
    v.add_argument("--sequences", type=bounded_int(1, 4096), default=2, help="validation sequences (default 2)")
    v.add_argument("--T", type=bounded_int(1, MAX_T), default=None,
                   help="tokens per sequence (default the run's seq_len)")
    v.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    v.add_argument("--mode", default="sim", choices=("sim", "2proc"))
    add_peer_timeout_arg(v)
    v.add_argument("--all-positions", action="store_true",
                   help="reveal every position's logits to the client (needed for the perplexity; reveals more "
                        "than the next token)")
    v.add_argument("--data", default=None, help="Hugging Face models: evaluate on this source (files:<glob>, "
                                                "hf:<id>, stdlib) instead of the standard library's validation split")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)

    e = sub.add_parser("export", help="split a model into the client bundle and the server's tensors")
    e.add_argument("run_dir", help="RUN_DIR, a Hugging Face save_pretrained directory or hf:<id>")
    e.add_argument("out_dir")
    e.add_argument("--T", type=bounded_int(1, MAX_T), default=None,
                   help="the prompt length the traced program is exported for (required)")
    e.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="export for `privlm pi generate` instead: the prefill (T tokens) and decode programs "
                        "(cache capacity T + N - 1), for up to N new tokens")
    e.set_defaults(func=cmd_export)

    from privlm.spu import calibrate as _cal
    _cal.register(sub)
    from privlm.spu import generate_cli as _gen
    _gen.register(sub)




def cmd_run(args) -> int:
    from privlm.spu.launcher import run_parties
    from privlm.spu.report import format_table, summarize

    run_dir = Path(args.run_dir)
    if args.prompt is not None:
        check_text(args.prompt, "--prompt", PrivlmError)
    from privlm.hfmodel import is_hf_spec

    check_spu_profile(args.spu_profile)
    hf = is_hf_spec(args.run_dir)
    if not hf and not run_dir.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    if args.chunks < 1:
        raise PrivlmError(f"--chunks={args.chunks} must be >= 1")
    if args.matmul_block is not None and args.matmul_block < 1:
        raise PrivlmError(f"--matmul-block={args.matmul_block} must be >= 1")
    if args.peer is not None and args.mode != "2proc":
        raise PrivlmError("--peer needs --mode 2proc")
    if args.peer is not None:
        from privlm.spu.launcher import check_peers
        check_peers(args.peer)
    if args.party is not None and args.mode != "2proc":
        raise PrivlmError("--party needs --mode 2proc")
    link = None
    if args.wan is not None:
        from privlm.spu.wan import WanLink, check_available
        if args.mode != "2proc" or args.party is not None or args.peer is not None:
            raise PrivlmError("--wan needs --mode 2proc with both parties on this machine (no --party, no --peer)")
        link = WanLink.parse(args.wan)
        check_available()
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        raise PrivlmError(f"--keep directory '{args.keep}' exists and is not empty; choose a new one")
    # the export holds the server's weights: a temporary one is removed even if this process is killed
    kind = None if hf else export_kind(run_dir)
    if kind == "generate":
        raise PrivlmError(f"'{run_dir}' is an export for `privlm pi generate` (prefill/ and decode/ programs); "
                          f"`pi run` needs a model or an export made without --max-new-tokens")
    with contextlib.nullcontext(Path(args.keep)) if args.keep else private_tempdir("privlm-pi-") as work:
        bundle = run_dir / TRACE_FILE if kind == "run" else None
        client_only = args.party == 0 and bundle is not None
        ref = model = tok = None
        if client_only:  # a client machine: the traced program, its public constants and the tokenizer, no weights
            meta = read_json(bundle)  # schema: format, T, vocab_size
            public, weights, vocab = bundle, None, meta["vocab_size"]
            tok = bundle_tokenizer(run_dir)
            block = meta["T"]
        else:
            model, tok, vocab, block, _ = _load(args.run_dir, args.T or 1)
        if args.party != 1 and args.prompt is None and args.tokens is None:
            raise PrivlmError("give --prompt or --tokens (only the server, --party 1, runs without one)")
        if args.party == 1:
            if args.T is None:
                raise PrivlmError("--party 1 (server) needs --T, the public prompt length")
            ids, T = None, args.T
        else:
            ids = _tokens(args, tok, vocab)
            T = len(ids)
        if client_only and T != block:
            raise PrivlmError(f"the prompt has {T} tokens but the client bundle's program was exported for T={block} "
                              f"(privlm pi export --T)")
        if block is not None and T > block:
            raise PrivlmError(f"the prompt has {T} tokens but the model's position table holds {block}")
        if model is not None:
            from privlm.spu.export import plain_logits, save_traced
            public, weights = save_traced(model, work / "export", T)
            if ids is not None:
                ref = plain_logits(model, [ids])[0]
        def launch(net=None):
            return run_parties(work, public, weights=weights, tokens=ids, T=T, protocol=args.protocol,
                               mode=args.mode, peers=args.peer, party=args.party, head=args.head,
                               chunks=args.chunks, matmul_block=args.matmul_block, spu_profile=args.spu_profile,
                               wan=net, peer_timeout=args.peer_timeout, delete_weights=not args.keep)
        if link is not None:
            from privlm.spu.wan import wan_namespaces
            with wan_namespaces(link) as net:
                out = launch(net)
        else:
            out = launch()
        if out is None:
            print(f"party 1 (server) finished; T={T}, protocol {args.protocol}, SPU profile {args.spu_profile}")
            return 0
        result, logits = out
        cen = None
        if model is not None and args.head == "all":
            from privlm.pi.census import census
            cen = census(model, T)
        doc = {"run": args.run_dir, **summarize(result, logits, ref, cen)}
        if link is not None:
            doc["wan"] = wan_report(doc, link, model, T, args.spu_profile if cen is not None else None)
        if tok is not None:
            doc["predicted_text"] = tok.decode([doc["predicted_token"]])
        print(json.dumps(doc, indent=1) if args.json else format_table(doc))
        if link is not None and not args.json:
            w = doc["wan"]
            print(f"WAN {w['rate']}, {w['one_way_delay_ms']:g} ms one way (namespaces + tbf + delay proxy): "
                  f"online {w['measured_online_seconds']:.1f} s measured; estimate {w['estimate_seconds']:.1f} s "
                  f"(transfer {w['transfer_seconds_estimate']:.1f} s + rounds {w['rounds_estimate']})")
        return 0


def wan_report(doc: dict, link, model, T: int, spu_profile: str | None) -> dict:
    """Measured time over the emulated WAN beside the estimate bytes / rate + rounds x delay. Rounds are the
    calibrated profile's nonlinear rounds for this model's census (None without a calibrated profile)."""
    transfer = doc["bytes_online_excluding_setup"] * 8 / link.bits_per_second  # the online phase is what is timed
    rounds = None
    if spu_profile is not None:
        from privlm.pi import census, load_profile, predict
        from privlm.spu.calibrate import cost_profile_name
        try:
            rounds = predict(census(model, T), load_profile(cost_profile_name(spu_profile))).rounds
        except Exception:  # no calibrated profile for this SPU profile: the estimate stays transfer-only
            rounds = None
    latency = None if rounds is None else rounds * link.delay_ms / 1000
    return {**link.to_dict(), "measured_online_seconds": doc["online_seconds"],
            "measured_wall_seconds": doc["wall_seconds"], "transfer_seconds_estimate": transfer,
            "rounds_estimate": rounds, "latency_seconds_estimate": latency,
            "estimate_seconds": transfer + (latency or 0.0)}


def cmd_export(args) -> int:
    from privlm.hfmodel import is_hf_spec
    from privlm.spu.export import save_traced

    run_dir, out = Path(args.run_dir), Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise PrivlmError(f"output directory '{out}' exists and is not empty; choose a new one")
    if args.T is None:
        raise PrivlmError("the 2PC program is traced for one prompt length: give --T")
    N = args.max_new_tokens
    if N is not None and N <= 0:
        raise PrivlmError(f"--max-new-tokens={N} must be >= 1")
    model, tok, _, block, _ = _load(args.run_dir, args.T)
    if not 1 <= args.T <= (block or args.T):
        raise PrivlmError(f"--T={args.T} must be in 1..{block} (the model's positions)")
    if N is not None and block is not None and args.T + N > block:
        raise PrivlmError(f"--T={args.T} + --max-new-tokens={N} need {args.T + N} positions; the model has {block}")
    client = out / "client"
    client.mkdir(parents=True)
    # program.json + public.safetensors for both parties, server.safetensors for the server only
    if N is None:
        public, _ = save_traced(model, out / "server", args.T)
        copy_public(public.parent, client)
    else:  # the generation counterpart: the same files for each of its programs (prefill/, decode/)
        from privlm.generate_trace import save_generation, trace_generation
        save_generation(trace_generation(model, args.T, args.T + N - 1), out / "server")
        for program in sorted(p for p in (out / "server").iterdir() if p.is_dir()):
            copy_public(program, client / program.name)
    src_tok = (run_dir if not is_hf_spec(args.run_dir) or run_dir.is_dir() else None)
    if src_tok is not None and (src_tok / "tokenizer.json").is_file():
        shutil.copy(src_tok / "tokenizer.json", client / "tokenizer.json")
    print(f"client bundle (give to the client): {client}\nserver files (keep): {out / 'server'}")
    return 0


def _eval_ids(args, sequences: int):
    """(model, token ids [N, T], T, what the sequences are) for `pi eval`: a privlm run's first N validation chunks,
    or a Hugging Face model's first N chunks of text tokenized with its own tokenizer."""
    import dataclasses

    import numpy as np

    from privlm.hfmodel import is_hf_spec
    if is_hf_spec(args.run_dir):
        from privlm.hfmodel import check_length, load_model as load_hf, shape_of, text_chunks
        hf = load_hf(args.run_dir)
        T = args.T or min(128, shape_of(hf.model.config)["max_positions"] or 128)
        if T < 2:
            raise PrivlmError(f"--T={T} must be at least 2")
        check_length(hf.model.config, T)
        chunks, what = text_chunks(hf, T, args.data)
        model = hf.model
    else:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise CheckpointError(f"run directory '{run_dir}' does not exist")
        if args.data is not None:
            raise PrivlmError("--data applies to Hugging Face models; a privlm run is evaluated on its validation split")
        _check_2pc_memory(run_dir, args.T or 2, sequences)
        from privlm.data import prepare_data
        from privlm.spu.export import load_model
        cfg, model, _ = load_model(run_dir)
        T = args.T or cfg.data.seq_len
        if not 2 <= T <= min(cfg.data.seq_len, cfg.model.block_size):
            raise PrivlmError(f"--T={T} must be in 2..{min(cfg.data.seq_len, cfg.model.block_size)} (the run's chunks)")
        data_cfg = dataclasses.replace(cfg.data, tokenizer=str(run_dir / "tokenizer.json"))
        chunks, what = prepare_data(data_cfg, None).valid, "validation split"
    if len(chunks) < sequences:
        raise PrivlmError(f"'{args.run_dir}': {what} has {len(chunks)} sequences of T={T}, fewer than "
                          f"--sequences={sequences}")
    return model, np.asarray(chunks[:sequences, :T], dtype=np.int64), T, what  # the first N chunks: reproducible


def cmd_eval(args) -> int:
    from privlm.spu.export import plain_logits, save_traced
    from privlm.spu.launcher import run_parties
    from privlm.spu.report import accuracy_under_2pc

    check_spu_profile(args.spu_profile)
    if args.sequences < 1:
        raise PrivlmError(f"--sequences={args.sequences} must be >= 1")
    model, ids, T, what = _eval_ids(args, args.sequences)
    ref = plain_logits(model, ids)
    head = "all" if args.all_positions else "last"
    with private_tempdir("privlm-pi-eval-") as tmp:
        public, weights = save_traced(model, tmp / "export", T)
        result, logits = run_parties(tmp, public, weights=weights, tokens=ids.tolist(), T=T,
                                     protocol=args.protocol, mode=args.mode, spu_profile=args.spu_profile,
                                     sequences=args.sequences, head=head, peer_timeout=args.peer_timeout,
                                     delete_weights=True)
    if not args.all_positions:  # the client learned the last position's logits only: score those
        ref, ids = ref[:, -1:], ids[:, -1:]
    logits = logits.reshape(ref.shape)
    doc = {"run": str(args.run_dir), "spu_profile": args.spu_profile, "protocol": args.protocol, "mode": args.mode,
           "sequences": args.sequences, "T": T, "data": what, "all_positions": args.all_positions,
           "spu_version": result["spu_version"], "spu_settings": result["spu_settings"],
           **accuracy_under_2pc(ref, logits, ids),
           "bytes_online_per_sequence": [s["bytes_online"] for s in result["sequences"]],
           "wall_seconds": result["wall_seconds"]}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    where = "all positions" if args.all_positions else "the last position of each sequence"
    print(f"{doc['run']}: {args.sequences} sequences ({what}) x T={T} under {args.protocol.upper()} "
          f"(SPU profile {args.spu_profile}); the client received the logits of {where}\n"
          f"  top-1 agreement with plaintext: {100 * doc['top1_agreement']:.2f}% of {doc['positions']} positions"
          f" ({doc['disagreements']} differ; largest plaintext logit gap among them "
          f"{doc['max_disagreement_margin']:.3g})\n"
          f"  logit error: mean {doc['mean_logit_err']:.2e}, max {doc['max_logit_err']:.2e}")
    if doc["ppl_2pc"] is not None:
        print(f"  perplexity: 2PC {doc['ppl_2pc']:.4f}, plaintext {doc['ppl_plain']:.4f} "
              f"({100 * doc['ppl_rel_diff']:+.3f}%) over {doc['predicted_positions']} predicted tokens")
    else:
        print("  perplexity: needs every position's logits (--all-positions)")
    return 0
