"""Model diffing with a two-source crosscoder: which latents belong to which source.

Per latent j with decoder directions d_j^A, d_j^B (one per source):

- relative decoder norm r_j = ||d_j^B|| / (||d_j^A|| + ||d_j^B||): 0 = only A writes it, 1 = only B,
  around 0.5 = shared (Lindsey et al. 2024 plot this ratio's histogram);
- the cosine between d_j^A and d_j^B, which tells a shared latent that means the same in both
  sources from one whose directions differ;
- Latent Scaling (Minder et al. 2025): the least-squares scale beta_j that best explains a target
  y (for example one source's activations, or its reconstruction error without latent j) with the
  latent's contribution f_j(x) d_j:  beta_j = sum_n f_nj <d_j, y_n> / (||d_j||^2 sum_n f_nj^2).
  `ScalingRatios` turns four such fits into the paper's two ratios: nu_error flags complete
  shrinkage (the other source carries the latent in its reconstruction error) and nu_recon latent
  decoupling (other latents rebuild it there); a truly specific latent has both near 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.config import mixture_parts
from saelab.errors import DataError
from saelab.sae import CrossCoder, SparseCode
from saelab.store import FeatureStore, StoreError

CLASSES = ("A-only", "shared", "B-only")


def relative_norms(cc: CrossCoder, a: int = 0, b: int = 1) -> Tensor:
    """r_j = ||d_j^b|| / (||d_j^a|| + ||d_j^b||) for every latent [d_sae] (decoders in model units)."""
    norms = _model_unit_decoders(cc).norm(dim=2)
    return norms[:, b] / (norms[:, a] + norms[:, b]).clamp_min(1e-12)


def decoder_cosines(cc: CrossCoder, a: int = 0, b: int = 1) -> Tensor:
    """Cosine similarity between each latent's decoder directions in sources a and b [d_sae]."""
    dec = _model_unit_decoders(cc)
    return torch.nn.functional.cosine_similarity(dec[:, a], dec[:, b], dim=1)


def _model_unit_decoders(cc: CrossCoder) -> Tensor:
    """Decoder directions in each source's own units [d_sae, S, d]: W_dec / act_scale, per source."""
    return cc.decoder_directions().view(cc.d_sae, cc.n_sources, cc.d_source)


def classify(rel_norm: Tensor, low: float = 0.1, high: float = 0.9) -> list[str]:
    """Label latents by relative norm: < low 'A-only', > high 'B-only', otherwise 'shared'."""
    if not 0.0 <= low < high <= 1.0:
        raise DataError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    return [CLASSES[0] if r < low else CLASSES[2] if r > high else CLASSES[1] for r in rel_norm.tolist()]


@dataclass
class LatentScaling:
    """Streaming sums for the closed-form Latent Scaling fit of every latent at once."""

    directions: Tensor
    """[d_sae, d] the direction each latent writes (e.g. one source's decoder, in model units)."""

    def __post_init__(self) -> None:
        d_sae = self.directions.shape[0]
        self.num = torch.zeros(d_sae, dtype=torch.float64, device=self.directions.device)
        self.f_sq = torch.zeros(d_sae, dtype=torch.float64, device=self.directions.device)

    def update(self, acts: Tensor | SparseCode, targets: Tensor, own_dot: Tensor | None = None) -> None:
        """Add a batch: latent activations (dense [N, d_sae] or a `SparseCode`) and the targets [N, d].

        `own_dot` [d_sae] = <d_j, c_j> fits latent j to `targets - f_j c_j` instead (e.g. c_j = j's own
        decoder in that source: the target without j's contribution), at no extra cost.
        """
        lead = acts.values if isinstance(acts, SparseCode) else acts
        n = lead.shape[0]
        if n != targets.shape[0] or targets.shape[1] != self.directions.shape[1]:
            raise DataError(
                f"acts {tuple(lead.shape)} and targets {tuple(targets.shape)} do not match "
                f"directions {tuple(self.directions.shape)}"
            )
        if isinstance(acts, SparseCode):
            k = acts.values.shape[1]
            rows = torch.arange(n, device=targets.device).repeat_interleave(k)
            cols, f = acts.indices.reshape(-1), acts.values.reshape(-1).double()
        else:
            rows, cols = acts.nonzero(as_tuple=True)
            f = acts[rows, cols].double()
        # sum_n f_nj <d_j, y_n> = <d_j, sum_n f_nj y_n>: a sparse [d_sae, N] x [N, d] product does
        # ~k/d_sae of the dense work and never builds [N, d_sae] or [N, k, d].
        F_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), f, (len(self.num), n), check_invariants=False)
        with torch.autocast(targets.device.type, enabled=False):
            weighted = torch.sparse.mm(F_t, targets.double())
        f_sq = torch.zeros_like(self.f_sq).index_add_(0, cols, f * f)
        self.num += (weighted * self.directions.double()).sum(1)
        if own_dot is not None:
            self.num -= f_sq * own_dot.double()
        self.f_sq += f_sq

    def betas(self) -> Tensor:
        """beta_j = sum_n f_nj <d_j, y_n> / (||d_j||^2 sum_n f_nj^2); NaN for latents that never fired."""
        den = self.directions.double().pow(2).sum(1) * self.f_sq
        return torch.where(den > 0, self.num / den.clamp_min(1e-300), torch.full_like(self.num, float("nan")))


class ScalingRatios:
    """Latent Scaling's two ratios (Minder et al. 2025) for every latent of a two-source crosscoder.

    Each latent j is fitted along its owner's decoder direction d_j (owner: the source where its decoder
    norm is larger; the other source is the one it may be specific against), four ways: to each
    source's reconstruction error with j's own contribution added back (eps_s + f_j D_s[j], what would
    be left to explain without j), to the owner's reconstruction r_owner, and to the other source's
    reconstruction by the other latents (r_other - f_j D_other[j]). Then

    - nu_error = beta(eps_other) / beta(eps_owner): near 0 when the other source's activations do not
      carry the latent; large when they do but its decoder there shrank to nothing (complete shrinkage);
    - nu_recon = beta(r_other) / beta(r_owner): large when other latents rebuild it in the other source
      (latent decoupling).

    A truly source-specific latent has both near 0. Sums stream over batches; `sums` / `add_sums`
    carry them between processes (the analysis spills them with each chunk).
    """

    KINDS = ("error", "recon")

    def __init__(self, decoders: Tensor):
        """decoders [d_sae, 2, d]: each latent's decoder direction per source, in model units."""
        if decoders.dim() != 3 or decoders.shape[1] != 2:
            raise DataError(f"decoders must be [d_sae, 2, d]; got {tuple(decoders.shape)}")
        norms = decoders.norm(dim=2)
        self.owner = (norms[:, 1] > norms[:, 0]).long()
        rows = torch.arange(len(decoders), device=decoders.device)
        dirs = decoders[rows, self.owner]
        self.own_dot = (dirs[:, None, :] * decoders).sum(2)  # [d_sae, 2]: <d_j, D_s[j]>
        self.fits = {(kind, s): LatentScaling(dirs) for kind in self.KINDS for s in (0, 1)}

    def update(self, x: Tensor, recon: Tensor, acts: Tensor | SparseCode) -> None:
        """Add a batch: activations and reconstructions [N, 2, d] (model units), latent activations
        (dense [N, d_sae] or a `SparseCode`)."""
        for s in (0, 1):
            self.fits["error", s].update(acts, x[:, s] - recon[:, s], own_dot=-self.own_dot[:, s])
            other = (self.owner != s).to(self.own_dot)
            self.fits["recon", s].update(acts, recon[:, s], own_dot=self.own_dot[:, s] * other)

    def sums(self) -> Tensor:
        """The streamed sums [5, d_sae]: four numerators, then sum f^2."""
        return torch.stack([fit.num for fit in self.fits.values()] + [self.fits["error", 0].f_sq])

    def add_sums(self, sums: Tensor) -> None:
        """Add sums from `sums()` of another batch or process."""
        for fit, num in zip(self.fits.values(), sums[:4], strict=True):
            fit.num += num.to(fit.num)
            fit.f_sq += sums[4].to(fit.f_sq)

    def ratios(self) -> dict[str, Tensor]:
        """{'nu_error', 'nu_recon'}: [d_sae] each, beta(other source) / beta(owner); NaN where never fired."""
        rows = torch.arange(len(self.owner), device=self.owner.device)
        out = {}
        for kind in self.KINDS:
            betas = torch.stack([self.fits[kind, s].betas() for s in (0, 1)], dim=1)
            out[f"nu_{kind}"] = betas[rows, 1 - self.owner] / betas[rows, self.owner]
        return out


def latent_scaling(acts: Tensor | SparseCode, directions: Tensor, targets: Tensor) -> Tensor:
    """Closed-form Latent Scaling betas [d_sae] for acts (dense [N, d_sae] or a `SparseCode`),
    directions [d_sae, d] and targets [N, d]."""
    fit = LatentScaling(directions)
    fit.update(acts, targets)
    return fit.betas()


def report(fs: FeatureStore, sae_id: str, top: int = 5, examples: int = 3, nu_below: float = 0.3) -> str:
    """A text summary of an analysed two-source crosscoder's diffing, from the feature store.

    Latents per class (by relative decoder norm) and how many of them Latent Scaling confirms as
    source-specific (nu_error and nu_recon below `nu_below`); then, for each source, the `top` latents
    that lean most to it, with their Latent Scaling ratios and their `examples` top activating contexts.
    Only latents that fired in the analysis are listed. When the analysis read a mixture of corpora
    ('a+b'), it also says which corpus the stored top examples come from: over all fired latents,
    over each listed group, and per listed latent.
    """
    info = fs.sae(sae_id)
    try:
        leaning = fs.leaning(sae_id, top)
    except StoreError as e:
        raise DataError(str(e)) from None
    groups = {name: leaning[name] for name in ("B", "A")}
    sources = info.params.get("sources") or ["source A", "source B"]
    counts, confirmed = fs.diffing_counts(sae_id), fs.diffing_counts(sae_id, nu_below=nu_below)
    lines = [
        f"{sae_id}: {info.d_sae} latents over A = {sources[0]}, B = {sources[1]} ({info.n_tokens} tokens)",
        f"  {'class':<8} {'latents':>8} {f'nu < {nu_below:g}':>10}",
        *(f"  {c:<8} {counts.get(c, 0):>8} {confirmed.get(c, 0):>10}" for c in CLASSES),
    ]
    fired = fs.fired_features(sae_id)
    parts = mixture_parts(info.params.get("dataset") or "")  # older analyses record no dataset
    origins = None
    if len(parts) > 1:  # [fired latent x corpus] counts of stored top examples
        origins = fs.example_origins(sae_id, len(parts))
        origins = origins.reindex(index=fired, columns=range(len(parts)), fill_value=0)
    if origins is not None:
        lines.append("\ntop examples by corpus (" + " / ".join(Path(p).name or p for p in parts) + "):")
        named = {
            "all fired latents": fired,
            **{f"{top} leaning most to {g}": list(d["feature"]) for g, d in groups.items()},
        }
        lines += [f"  {name:<26} {_shares(origins.loc[ids].sum())}" for name, ids in named.items()]
    for name, source in (("B", sources[1]), ("A", sources[0])):
        lines.append(f"\nlatents leaning most to {name} ({source}):")
        for row in groups[name].itertuples():
            where = "" if origins is None else f"  top examples {_shares(origins.loc[row.feature], percent=False)}"
            lines.append(
                f"  #{row.feature:<6} {row.diff_class:<7} rel norm {row.rel_norm:.3f}  cos {row.dec_cos:+.2f}"
                f"  nu_error {row.nu_error:.2f}  nu_recon {row.nu_recon:.2f}{where}"
            )
            top_examples = fs.dashboard(sae_id, row.feature).top_examples[:examples]
            lines += [f"      {ex.act:7.2f}  {ex.marked()}" for ex in top_examples]
    return "\n".join(lines)


def _shares(counts: Any, percent: bool = True) -> str:
    """'12% / 88%' (or '3 / 17') for counts per corpus."""
    total = max(1, int(counts.sum()))
    return " / ".join(f"{100 * c / total:.0f}%" if percent else str(int(c)) for c in counts)
