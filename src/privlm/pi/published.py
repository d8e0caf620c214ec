"""The published PI-cost rows of 2501.03489 (Tables 3, 4, 7, 8) and AERO 2410.13060 (Tables 4, 5, 7, L=18).

``tables/published.csv`` is a verbatim transcription (docs/pi-cost.md#how-paper-fit-was-fitted): it is the test oracle of the
census and the data the ``paper-fit`` profile is fitted to. Empty cells were not printed (or not
transcribed). Each row names the privlm preset that builds the same model; ``variant=sota`` marks the
He & Hofmann "SOTA" rows, which are not privlm models and get `simplified_block_census` instead.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from privlm.config import ConfigError, load_config

if TYPE_CHECKING:  # the census (torch) is imported when a row is costed, not for the table names
    from privlm.pi.census import Census

TABLE_FILE = Path(__file__).parent / "tables" / "published.csv"

# table id -> (title, which paper)
TABLES: dict[str, str] = {
    "paper-t128": "2501.03489 Table 3: GPT-2 (L=12), CodeParrot, T=128",
    "paper-languini-t512": "2501.03489 Table 4: GPT-2 (L=12), Languini, T=512",
    "paper-t256": "2501.03489 Table 7: GPT-2 (L=12), CodeParrot, T=256",
    "paper-l18": "2501.03489 Table 8: GPT-2 (L=18), CodeParrot, T=128",
    "aero-t128": "AERO 2410.13060 Table 4: GPT-2 (L=12), CodeParrot, T=128",
    "aero-t256": "AERO 2410.13060 Table 5: GPT-2 (L=12), CodeParrot, T=256",
    "aero-l18": "AERO 2410.13060 L=18 table: GPT-2 (L=18), CodeParrot, T=128",
    "aero-languini-t512": "AERO 2410.13060 Table 7: GPT-2 (L=12), Languini, T=512",
}
MAIN_TABLES = ("paper-t128", "paper-languini-t512", "paper-t256", "paper-l18")  # 2501.03489's own tables


@dataclass(frozen=True)
class PublishedRow:
    table: str
    source: str
    group: str
    arch: str  # as printed
    preset: str  # privlm preset that builds this model
    variant: str  # "privlm" | "sota"
    T: int
    n_layer: int
    vocab: int
    ppl: str
    nonlinear: str  # "" when not printed/transcribed
    ffn_flops: str  # GFLOPs as printed ("14.5"), "" when not printed
    attn_flops: str
    comm_gb: float
    lat_min: float
    comm_sav: Optional[float]
    lat_sav: Optional[float]
    note: str

    @property
    def key(self) -> tuple:
        """Identity of the measurement (rows repeated across tables share it)."""
        return (self.variant, self.preset.replace("EReg(", "").replace("SM(t)", "SM").rstrip(")"),
                self.T, self.n_layer, self.vocab, self.comm_gb, self.lat_min)

    def census(self) -> Census:
        return row_census(self.preset, self.variant, self.T, self.n_layer, self.vocab)


def load_rows(table: Optional[str] = None) -> list[PublishedRow]:
    if table is not None and table not in TABLES:
        raise ConfigError(f"unknown table '{table}'; choose one of: {', '.join(TABLES)}")
    rows = []
    with TABLE_FILE.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if table is not None and r["table"] != table:
                continue
            rows.append(PublishedRow(
                table=r["table"], source=r["source"], group=r["group"], arch=r["arch"], preset=r["preset"],
                variant=r["variant"], T=int(r["T"]), n_layer=int(r["n_layer"]), vocab=int(r["vocab"]),
                ppl=r["ppl"], nonlinear=r["nonlinear"], ffn_flops=r["ffn_flops"], attn_flops=r["attn_flops"],
                comm_gb=float(r["comm_gb"]), lat_min=float(r["lat_min"]),
                comm_sav=float(r["comm_sav"]) if r["comm_sav"] else None,
                lat_sav=float(r["lat_sav"]) if r["lat_sav"] else None, note=r["note"]))
    return rows


def unique_rows(rows: list[PublishedRow]) -> list[PublishedRow]:
    """Drop repeats of the same measurement (AERO reprints 2501's rows; EReg rows equal their base model)."""
    seen, out = set(), []
    for r in rows:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out


@functools.lru_cache(maxsize=None)
def row_census(preset: str, variant: str, T: int, n_layer: int, vocab: int) -> Census:
    cfg = load_config(preset, [f"model.n_layer={n_layer}", f"model.vocab_size={vocab}"])
    from privlm.pi.census import census, simplified_block_census
    c = census(cfg, T)
    return simplified_block_census(c) if variant == "sota" else c


def paper_round(value: float, decimals: int) -> float:
    """Round like the paper's FLOP columns: to 2 decimals first, then (half up) to the printed precision.

    Every printed FLOP value follows this, including 7.248B printed as 7.3B (7.248 -> 7.25 -> 7.3), which a
    single rounding would print as 7.2 (docs/pi-cost.md#two-flop-conventions).
    """
    from decimal import ROUND_HALF_UP, Decimal

    two = Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return float(two.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def printed_decimals(cell: str) -> int:
    return len(cell.split(".")[1]) if "." in cell else 0
