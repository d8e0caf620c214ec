"""privlm.pi: private-inference cost of a model: nonlinear-op census, FLOPs and a per-op cost model.

`census(model_or_config, T)` walks the model for the paper's workload (one output token after a T-token
prompt); `load_profile(name)` reads a cost profile (the user's
``$PRIVLM_HOME/profiles`` first, then the read-only ones shipped under ``profiles/``); `predict(census,
profile)` combines them linearly into communication (GB) and latency (minutes). See docs/pi-cost.md.
"""
from typing import TYPE_CHECKING

from privlm.lazy import lazy_exports
from privlm.opschema import OP_ABBREV, OP_TYPES

if TYPE_CHECKING:
    from privlm.pi.census import Census, NonlinearOp, census, simplified_block_census
    from privlm.pi.costs import Cost, Profile, available_profiles, load_profile, predict, save_profile
    from privlm.pi.summary import CostSummary

__all__ = ["census", "Census", "NonlinearOp", "simplified_block_census", "OP_TYPES", "OP_ABBREV",
           "Profile", "Cost", "CostSummary", "load_profile", "available_profiles", "predict", "save_profile"]
# imported on first use: a light submodule (pi.summary, the cost command's parser) must not import torch
lazy_exports(__name__, {
    **dict.fromkeys(["Census", "NonlinearOp", "census", "simplified_block_census"], "privlm.pi.census"),
    **dict.fromkeys(["Cost", "Profile", "available_profiles", "load_profile", "predict", "save_profile"],
                    "privlm.pi.costs"),
    "CostSummary": "privlm.pi.summary",
})
