"""Typed results of evaluations and steering measurements, each with `to_dict()` for JSON.

No torch here: `eval.json`, the feature store and the app read and show these without a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


def _without_none(record: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


@dataclass
class ReconMetrics:
    """Reconstruction quality, sparsity and latent health over the tokens an SAE reads (massive-norm
    tokens left out)."""

    tokens: int
    """Tokens measured."""
    l0: float
    """Mean active latents per token."""
    mse: float
    """Squared error summed over the input's dimensions, mean over tokens."""
    fvu: float
    """Fraction of variance unexplained."""
    dead_frac: float
    """Share of latents that never fired."""
    dense_frac: float
    """Share of latents firing on more than `DENSE_THRESHOLD` of tokens."""
    density_histogram: dict[str, list[float]]
    """Histogram of log10 firing rates of the live latents: {'log10_density_edges', 'counts'}."""
    error_predictable: float | None = field(default=None, kw_only=True)
    """Dark matter (Engels et al. 2024): share of the error vector's variance a linear map of the input
    predicts (held-out R^2). Measured by `saelab eval`."""
    error_norm_predictable: float | None = field(default=None, kw_only=True)
    """... of the error norm's variance a linear function of the input predicts."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view for JSON (optional fields that are unset are left out)."""
        return _without_none(self)


@dataclass
class SpliceMetrics(ReconMetrics):
    """`ReconMetrics` plus next-token loss with the SAE's reconstruction spliced into the model."""

    ce_loss_clean: float
    """Mean next-token CE of the unmodified model."""
    ce_loss_sae: float
    """... with the reconstruction in place of the activations at ordinary tokens."""
    ce_loss_zero_ablation: float
    """... with those activations zeroed."""
    ce_loss_increase: float
    """ce_loss_sae - ce_loss_clean (nats)."""
    ce_loss_recovered: float
    """(CE_zero - CE_sae) / (CE_zero - CE_clean); NaN when ablating changes nothing."""
    kl_div: float
    """KL(clean || spliced) per predicted token."""
    outlier_frac: float
    """Share of tokens passed through unchanged (massive norms)."""
    eval_tokens: int
    """Held-out tokens the model ran on."""
    ce_loss_all_tokens: float | None = None
    """CE with the SAE spliced in at every token, outliers included (when asked for)."""
    kl_div_all_tokens: float | None = None
    """KL for the same run."""
    source: str | None = None
    """'model@hook' of a crosscoder's source (None for an SAE)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view for JSON: the source (if any) first, eval_tokens last (eval.json's order)."""
        d = _without_none(self)
        d["eval_tokens"] = d.pop("eval_tokens")
        return {"source": d.pop("source")} | d if "source" in d else d


@dataclass
class EvalResult:
    """What `saelab eval` and the end of training measure: one `SpliceMetrics` per source (one for an
    SAE) and what was evaluated. `to_dict()` is the `eval.json` format."""

    sources: list[SpliceMetrics]
    sparsifier: str
    d_sae: int
    k: int
    hook_name: str
    dead_frac_train: float | None = None
    """Dead-latent share at the end of training (from metrics.jsonl), when the run was trained here."""

    def to_dict(self) -> dict[str, Any]:
        """A flat dict for an SAE; {'per_source': [...], 'eval_tokens': n, ...} for a crosscoder."""
        meta = {} if self.dead_frac_train is None else {"dead_frac_train": self.dead_frac_train}
        meta |= {"sparsifier": self.sparsifier, "d_sae": self.d_sae, "k": self.k, "hook_name": self.hook_name}
        if len(self.sources) == 1:
            return self.sources[0].to_dict() | meta
        per_source = [{k: v for k, v in s.to_dict().items() if k != "eval_tokens"} for s in self.sources]
        return {"per_source": per_source, "eval_tokens": self.sources[0].eval_tokens} | meta


@dataclass
class SteeringEffect:
    """Cost and effect of one steering setting on held-out text (`saelab.steering.steering_effects`)."""

    ce_loss: float
    """Mean next-token CE with the intervention."""
    ce_clean: float
    """... without it."""
    ce_increase: float
    """ce_loss - ce_clean."""
    kl: float
    """KL(clean || steered) per predicted token."""
    target_logprob: float | None = None
    """Mean log P(next token is one of the targets) with the intervention (when targets were given)."""
    target_logprob_clean: float | None = None
    """... without it."""
    delta_logprob: float | None = None
    """target_logprob - target_logprob_clean."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (target columns only when targets were given)."""
        return _without_none(self)


TABLE_KEYS = (
    ("fvu", "FVU (ordinary tokens)"),
    ("mse", "MSE"),
    ("l0", "L0"),
    ("dead_frac", "dead latents (eval)"),
    ("dead_frac_train", "dead latents (training)"),
    ("dense_frac", f"dense latents (>{DENSE_THRESHOLD:g})"),
    ("ce_loss_clean", "CE loss, clean"),
    ("ce_loss_sae", "CE loss, SAE spliced in"),
    ("ce_loss_zero_ablation", "CE loss, zero ablation"),
    ("ce_loss_increase", "CE loss increase (nats)"),
    ("ce_loss_recovered", "CE loss recovered"),
    ("kl_div", "KL(clean || spliced)"),
    ("ce_loss_all_tokens", "CE loss, SAE at every token"),
    ("error_predictable", "error linearly predictable (R^2)"),
    ("error_norm_predictable", "error norm linearly predictable (R^2)"),
    ("outlier_frac", "massive-norm tokens passed through"),
    ("eval_tokens", "held-out tokens"),
)


def format_table(result: EvalResult | ReconMetrics | dict[str, Any]) -> str:
    """Eval metrics as an aligned two-column text table (one per source for a crosscoder).

    Takes a result record or its dict form (an `eval.json`, also one written by an older saelab).
    """
    if not isinstance(result, dict):
        result = result.to_dict()
    if "per_source" in result:
        return "\n\n".join(
            f"source {s['source']}\n" + format_table(s | {"eval_tokens": result["eval_tokens"]})
            for s in result["per_source"]
        )
    rows = [(label, result[key]) for key, label in TABLE_KEYS if key in result]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for label, value in rows:
        text = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{label:<{width}}  {text}")
    return "\n".join(lines)
