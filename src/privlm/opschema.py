"""The op schema of private inference: op names, linear kinds, SPU step kinds and the two file formats.

One place for the vocabulary that the census (`privlm.pi.census`), the cost model (`privlm.pi.costs`,
`privlm.pi.fit`), the SPU program, its report, micro-benchmarks and calibration (`privlm.spu.*`) share.
It imports nothing but the standard library: the SPU environment (jax + spu, no torch) imports it too,
and `privlm.pi` imports torch at package import, so this module lives outside it.
"""
from __future__ import annotations

# Nonlinear op type -> its abbreviation in the paper's "#Nonlinear Ops" column. The paper's five ops first,
# then those of Hugging Face families (RMSNorm, SiLU, the SwiGLU gate's secret x secret product, rotary
# embeddings). The order is the display order everywhere.
OP_ABBREV: dict[str, str] = {"softmax": "SM", "layernorm": "LN", "rmsnorm": "RMS", "gelu": "G", "relu": "R",
                             "leaky_relu": "LR", "silu": "SiLU", "gate_product": "⊙", "rotary": "RoPE"}
OP_TYPES: tuple[str, ...] = tuple(OP_ABBREV)

# The ops a privlm model can contain, i.e. those the SPU program evaluates and `privlm pi calibrate`
# measures (the Hugging Face-only ops have no SPU kernel).
PRIVLM_OPS: tuple[str, ...] = ("softmax", "layernorm", "gelu", "relu", "leaky_relu")
ACTIVATION_OPS: tuple[str, ...] = ("gelu", "relu", "leaky_relu")
# The ops the traced program evaluates with an SPU kernel and `privlm pi calibrate` measures: privlm's five and
# the LLaMA family's (RMSNorm, SiLU, the SwiGLU gate product, rotary embeddings).
CALIBRATED_OPS: tuple[str, ...] = PRIVLM_OPS + ("rmsnorm", "silu", "gate_product", "rotary")

# Linear-layer kinds a cost profile prices per GFLOP.
LINEAR_KINDS: tuple[str, ...] = ("ffn", "attn", "embed_head")

# Census FLOP entries (keys of `Census.flops`, also the `census` field of linear SPU steps) -> linear kind.
LINEAR_KIND_OF: dict[str, str] = {"attn_proj": "attn", "attn_scores": "attn", "ffn": "ffn",
                                  "embedding": "embed_head", "lm_head": "embed_head"}
FLOP_ENTRIES: tuple[str, ...] = tuple(LINEAR_KIND_OF)

# Breakdown kinds of the SPU program's steps, as `privlm pi run` reports them, in display order.
STEP_KINDS: tuple[str, ...] = ("setup", "embedding", "layernorm", "matmul", "softmax", "activation", "head")

# File formats (name/version): the traced model the SPU parties read, and a cost profile.
TRACE_FORMAT = "privlm-trace/1"  # the op graph of a traced model (privlm.trace)
# A traced export directory: the op graph and the public constants (both parties), the server's tensors.
TRACE_FILE, CONSTANTS_FILE, SERVER_FILE = "program.json", "public.safetensors", "server.safetensors"
# A generation export (privlm.generate_trace.save_generation): one such directory per program.
PREFILL, DECODE = "prefill", "decode"

# Causal-mask constant. SPU's fixed-point exp evaluates exp(x) as (1 + x/2^n)^(2^n) and breaks for
# x far below -2^(n+1) (n = 8 by default: about -512); a mask of -1e4 therefore produced garbage
# attention. -100 is far enough below any real logit to give the masked keys exp(-100) ≈ 4e-44 weight
# (exactly 0 in float32 and in 18-bit fixed point) while staying in the range SPU's exp handles.
MASK_VALUE = -100.0
COST_PROFILE_FORMAT = "privlm-pi-cost-profile/1"
