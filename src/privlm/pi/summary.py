"""The PI cost of one model as one typed row: `CostSummary`.

`privlm cost` rows, the report's and the sweep's run rows, the demo table and the claims all carry these
fields under these names; JSON files store them flat (``to_dict``) and readers get them back by attribute
(``from_dict``), so a quantity has one name everywhere (FLOPs are counts, not GFLOPs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # annotations only: census and costs need nothing from here
    from privlm.pi.census import Census
    from privlm.pi.costs import Cost


@dataclass(frozen=True)
class CostSummary:
    arch: str
    T: int
    profile: str
    comm_gb: float            # predicted 2PC communication of one output token after a T-token prompt
    lat_min: float            # predicted latency, minutes
    complete: bool            # False: some op had no figure in the profile; comm_gb/lat_min are lower bounds
    unknown: tuple[str, ...]  # those ops
    nonlinear: str            # the "#Nonlinear Ops" cell, the paper's ops only
    nonlinear_all: str        # every nonlinear op, the final LayerNorm and the GQA/extra ops included
    ffn_flops: int
    attn_flops_paper: int     # projections + the paper's T² term (docs/pi-cost.md, two FLOP conventions)
    attn_flops_dense: int
    embed_head_flops: int
    comm_savings: Optional[float] = None  # baseline / this, set by `relative_to`
    lat_savings: Optional[float] = None
    vs: Optional[str] = None              # the baseline's architecture

    @classmethod
    def of(cls, c: "Census", cost: "Cost") -> "CostSummary":
        return cls(arch=c.arch, T=c.T, profile=cost.profile, comm_gb=cost.comm_gb, lat_min=cost.lat_min,
                   complete=cost.complete, unknown=tuple(cost.unknown),
                   nonlinear=c.nonlinear_label(paper_only=True), nonlinear_all=c.nonlinear_label(paper_only=False),
                   ffn_flops=c.ffn_flops, attn_flops_paper=c.paper_attn_flops, attn_flops_dense=c.attn_flops,
                   embed_head_flops=c.embed_head_flops)

    def relative_to(self, ref: "CostSummary | Cost") -> "CostSummary":
        """This row with the savings factors relative to ``ref`` (ref / this), a summary or a `Cost`."""
        return dataclasses.replace(self, comm_savings=ref.comm_gb / self.comm_gb,
                                   lat_savings=ref.lat_min / self.lat_min, vs=ref.arch)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unknown"] = list(self.unknown)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Optional["CostSummary"]:
        """The summary stored flat in a row (results.json, `privlm cost --format json`); None when the row has
        no cost (e.g. the profile lacked an op of the architecture)."""
        if d.get("comm_gb") is None:
            return None
        kw = {f.name: d.get(f.name) for f in dataclasses.fields(cls)}
        kw["unknown"] = tuple(kw["unknown"] or ())
        kw["complete"] = bool(kw["complete"]) if kw["complete"] is not None else not kw["unknown"]
        return cls(**kw)


FIELDS = tuple(f.name for f in dataclasses.fields(CostSummary))
