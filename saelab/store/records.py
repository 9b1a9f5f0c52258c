"""What the feature store returns: typed records whose fields name the columns they are read from.

Reads select `columns(Record)` by name and build records with `Record(**row)`, so adding a column
means adding it to the schema (`saelab.store.schema`) and a field here; no read depends on column
positions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from saelab.results import SteeringEffect
from saelab.store.schema import JSON_COLUMNS

DIFFING = {"table": "diffing"}
"""Field metadata: the field is read from the `diffing` table (crosscoders only)."""


def columns(record: type, prefix: str = "") -> tuple[str, ...]:
    """The column names a record type is read from (its table's fields, in order), optionally `prefix.`-ed."""
    return tuple(prefix + f.name for f in dataclasses.fields(record) if "derived" not in f.metadata)


@dataclass(frozen=True)
class SAEInfo:
    """One analysed SAE (a row of `saes`): identity, settings, evals and the density histogram."""

    sae_id: str
    run_dir: str
    model: str
    hook_name: str
    sparsifier: str
    d_in: int
    d_sae: int
    k: int | None
    n_tokens: int
    n_outliers: int
    n_dead: int
    context_size: int
    cfg: dict[str, Any]
    eval: dict[str, Any] | None
    params: dict[str, Any]
    timings: dict[str, float]
    density_edges: list[float]
    density_counts: list[int]

    @property
    def hook_label(self) -> str:
        """Where the SAE reads, and for a transcoder where it writes ('in -> out')."""
        out = (self.cfg or {}).get("hook_name_out")
        return f"{self.hook_name} → {out}" if out else self.hook_name

    @property
    def kind(self) -> str:
        """The sparsifier, and for a transcoder which kind ('topk (skip transcoder)')."""
        cfg = self.cfg or {}
        if not cfg.get("hook_name_out"):
            return self.sparsifier
        return f"{self.sparsifier} ({'skip ' if cfg.get('skip_connection') else ''}transcoder)"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SAEInfo:
        """Build from a `saes` row, decoding its JSON columns."""
        return cls(**{k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()})


SAE_COLUMNS = (*columns(SAEInfo), "saelab_version")
"""Columns a writer may set in `saes` (`created_at` is set on insert)."""


@dataclass(frozen=True)
class FeatureSummary:
    """One row of the feature list."""

    feature: int
    n_fires: int
    density: float
    mean_act: float
    max_act: float
    ctx_max_act: float | None
    """Largest |activation| on tokens with at least the analysis's `min_context` tokens before them
    (None if it never fired on one, or the SAE was analysed by a saelab older than store schema v5)."""
    neg_frac: float
    q50: float
    q90: float
    q99: float
    label: str | None


@dataclass(frozen=True)
class FeaturePage:
    """A page of the feature list and the number of features matching the filters."""

    total: int
    rows: list[FeatureSummary]


@dataclass(frozen=True)
class Example:
    """A token window around one activation of a feature (a row of `examples`)."""

    kind: str
    """'top' or 'band'."""
    band: int
    rank: int
    act: float
    seq: int
    pos: int
    token_ids: list[int]
    """The window's token ids."""
    tokens: list[str] = field(metadata={"derived": "token_ids"})
    """The window's tokens as text (from `token_ids` through the model's vocabulary)."""
    acts: list[float]
    """This feature's activation at every token of the window."""
    index: int = field(metadata={"derived": "pos - start"})
    """Index of the example's token within `tokens`."""

    def marked(self, before: int = 16, after: int = 4) -> str:
        """The window as one line of text, the example's token in [brackets] with `before` / `after`
        tokens of context (newlines shown as a return sign)."""
        i, t = self.index, self.tokens
        text = "".join(t[max(0, i - before) : i]) + f"[{t[i]}]" + "".join(t[i + 1 : i + 1 + after])
        return text.replace("\n", "\u21b5")


EXAMPLE_COLUMNS = (*columns(Example), "start")
"""Columns an `Example` is built from."""


@dataclass(frozen=True)
class FeatureDashboard:
    """Everything a feature's page shows."""

    sae_id: str
    summary: FeatureSummary
    hist_edges: list[float]
    hist_counts: list[int]
    band_edges: list[float]
    band_counts: list[int]
    top_examples: list[Example]
    band_examples: dict[int, list[Example]]
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    source_norms: list[float] | None = field(default=None, metadata=DIFFING)
    """Crosscoders: the latent's decoder norm in each source (None for an SAE)."""
    rel_norm: float | None = field(default=None, metadata=DIFFING)
    """Two sources: ||d_B|| / (||d_A|| + ||d_B||)."""
    dec_cos: float | None = field(default=None, metadata=DIFFING)
    """Two sources: cosine between the latent's two decoder directions."""
    diff_class: str | None = field(default=None, metadata=DIFFING)
    """Two sources: 'A-only', 'shared' or 'B-only' by relative norm."""
    nu_error: float | None = field(default=None, metadata=DIFFING)
    """Latent Scaling: beta(other source) / beta(owner) on reconstruction errors (large: complete shrinkage)."""
    nu_recon: float | None = field(default=None, metadata=DIFFING)
    """Latent Scaling: the same on reconstructions by the other latents (large: latent decoupling)."""


DIFFING_COLUMNS = tuple(f.name for f in dataclasses.fields(FeatureDashboard) if f.metadata.get("table") == "diffing")
"""Per-latent columns of the `diffing` table, as `FeatureDashboard` holds them."""

STEERING_COLUMNS = ("feature", "kind", "units", "strength", *columns(SteeringEffect), "targets")
"""Columns of a stored steering experiment: the setting, its `SteeringEffect`, the target tokens."""

BASELINE_KIND = "diff_in_means"
"""`kind` of a steering sweep's rows for the difference-in-means baseline (`saelab.steering.sweep`), beside
'add' and 'clamp': the feature they were matched to in size, the strength in the same units."""
