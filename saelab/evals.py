"""SAE evaluations: reconstruction quality, sparsity, latent health, and the SAE spliced into the model.

Conventions (documented because they change the numbers):
- FVU, MSE and L0 are measured over the tokens the SAE is meant to reconstruct: massive-norm
  outliers (norm above `cfg.exclude_norm_above`, see `saelab.activations`) are left out.
- CE loss and KL are over every next-token prediction of held-out text. With the SAE spliced in,
  ordinary tokens get the SAE's reconstruction and outliers pass through unchanged, as BOS does in
  SAELens evals. The zero-ablation baseline zeroes the same positions, so "CE-loss recovered" is the
  share of those positions' contribution the SAE keeps: (CE_zero - CE_sae) / (CE_zero - CE_clean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import check_sources, keep_mask
from saelab.config import DataConfig
from saelab.corpus import token_sequences
from saelab.errors import DataError
from saelab.models import HookFn, LanguageModel
from saelab.nexttoken import NextTokenLoss
from saelab.results import DENSE_THRESHOLD, EvalResult, ReconMetrics, SpliceMetrics
from saelab.rundir import RunDir
from saelab.sae import SAE


def density_histogram(firing_rate: Tensor, bins: int = 40) -> dict[str, list[float]]:
    """Histogram of log10 firing rates of the latents that fired at all (the usual density plot)."""
    live = firing_rate[firing_rate > 0].double().log10().cpu().numpy()
    counts, edges = np.histogram(live, bins=bins, range=(-7.0, 0.0))
    return {"log10_density_edges": edges.tolist(), "counts": counts.tolist()}


class DarkMatter:
    """How much of an SAE's error is linearly predictable from its input (Engels et al. 2024, "Decomposing
    the dark matter of sparse autoencoders").

    Two least-squares fits with a bias, from the input x [N, d]: of the error vector e = x - x_hat, and of
    its norm ||e||. Each is fitted on every other token and scored (R^2) on the rest, from running sums,
    so the scores are out of sample and memory does not grow with the tokens.
    """

    def __init__(self, d: int, device: torch.device, ridge: float = 1e-6):
        z = {"dtype": torch.float64, "device": device}
        self.ridge = ridge
        # [fit, score] halves: X~'X~, X~'e, X~'|e|, sum e, sum |e|^2 (as e.e), sum |e|, sum |e|^2 (as a scalar), n
        self.xx = [torch.zeros(d + 1, d + 1, **z) for _ in range(2)]
        self.xe = [torch.zeros(d + 1, d, **z) for _ in range(2)]
        self.xn = [torch.zeros(d + 1, **z) for _ in range(2)]
        self.e_sum = [torch.zeros(d, **z) for _ in range(2)]
        self.sq, self.norm_sum, self.norm_sq, self.n = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0, 0]

    def update(self, x: Tensor, err: Tensor) -> None:
        """Add a batch of inputs x [N, d] and errors x - x_hat [N, d]: even rows to the fit, odd to the score."""
        for h in range(2):
            xt = torch.cat([x[h::2].double(), x.new_ones(len(x[h::2]), 1, dtype=torch.float64)], dim=1)
            e = err[h::2].double()
            norm = e.norm(dim=1)
            self.xx[h] += xt.T @ xt
            self.xe[h] += xt.T @ e
            self.xn[h] += xt.T @ norm
            self.e_sum[h] += e.sum(0)
            self.sq[h] += float(e.pow(2).sum())
            self.norm_sum[h] += float(norm.sum())
            self.norm_sq[h] += float(norm.pow(2).sum())
            self.n[h] += len(e)

    def scores(self) -> tuple[float, float]:
        """(R^2 of the error vector, R^2 of the error norm) on the scoring half; NaN before two tokens."""
        if min(self.n) == 0:
            return math.nan, math.nan
        # A little ridge on the input's coefficients (not the bias) keeps the solve stable for collinear inputs.
        eye = torch.eye(len(self.xx[0]), dtype=torch.float64, device=self.xx[0].device)
        eye[-1, -1] = 0
        A = self.xx[0] + self.ridge * self.xx[0].diagonal()[:-1].mean() * eye
        W, w = torch.linalg.solve(A, self.xe[0]), torch.linalg.solve(A, self.xn[0])
        n, xx = self.n[1], self.xx[1]
        # Sums of squared residuals from the scoring half's sums: |e - W'x~|^2 = e.e - 2 tr(W'X~'e) + tr(W'X~'X~W)
        resid = self.sq[1] - 2 * float((W * self.xe[1]).sum()) + float((W * (xx @ W)).sum())
        total = self.sq[1] - float(self.e_sum[1].pow(2).sum()) / n
        resid_n = self.norm_sq[1] - 2 * float(w @ self.xn[1]) + float(w @ xx @ w)
        total_n = self.norm_sq[1] - self.norm_sum[1] ** 2 / n
        return 1 - resid / max(total, 1e-30), 1 - resid_n / max(total_n, 1e-30)


class _ReconStats:
    """Running sums for MSE / FVU / L0 / firing rates (and the error's dark matter) over a stream of batches."""

    def __init__(self, d_sae: int, device: torch.device, d_in: int = 0):
        self.dark = DarkMatter(d_in, device) if d_in else None
        self.n = 0
        self.sq_err = 0.0
        self.sum_x: Tensor | float = 0.0
        self.sum_sq = 0.0
        self.l0_sum = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, x: Tensor, recon: Tensor, acts: Tensor) -> None:
        x, recon = x.double(), recon.double()
        self.n += len(x)
        self.sq_err += float((recon - x).pow(2).sum())
        self.sum_x = self.sum_x + x.sum(0)
        self.sum_sq += float(x.pow(2).sum())
        nz = acts != 0
        self.l0_sum += float(nz.sum())
        self.fired += nz.sum(0)
        if self.dark is not None:
            self.dark.update(x, x - recon)

    def metrics(self) -> ReconMetrics:
        if self.n == 0:
            raise DataError("no tokens to evaluate on (all were excluded or the text was empty)")
        mean = self.sum_x / self.n
        total_var = self.sum_sq - self.n * float(mean.pow(2).sum())
        rate = self.fired.double() / self.n
        dark = self.dark.scores() if self.dark is not None else (None, None)
        return ReconMetrics(
            tokens=self.n,
            l0=self.l0_sum / self.n,
            mse=self.sq_err / self.n,
            fvu=self.sq_err / max(total_var, 1e-12),
            dead_frac=float((self.fired == 0).double().mean()),
            dense_frac=float((rate > DENSE_THRESHOLD).double().mean()),
            density_histogram=density_histogram(rate),
            error_predictable=dark[0],
            error_norm_predictable=dark[1],
        )


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, acts: Tensor, batch_size: int = 4096, targets: Tensor | None = None
) -> ReconMetrics:
    """L0, MSE, FVU, dead/dense fractions and the density histogram on activations [N, d_in] (a transcoder's
    reconstruction is measured against `targets` [N, d_out], its output hook's activations)."""
    sae.eval()
    if sae.cfg.transcoder and (targets is None or targets.shape != (len(acts), sae.d_out)):
        raise DataError(f"a transcoder is measured against targets [{len(acts)}, {sae.d_out}]: pass targets=")
    keep = keep_mask(acts, sae.cfg.exclude_norm_above)
    wanted = (targets if targets is not None else acts)[keep]
    stats = _ReconStats(sae.d_sae, acts.device)
    for x, y in zip(acts[keep].split(batch_size), wanted.split(batch_size), strict=True):
        a = sae.encode(x)
        stats.update(y, sae.decode(a) + sae.skip(x), a)
    return stats.metrics()


@torch.no_grad()
def spliced_metrics(
    sae: SAE,
    model: LanguageModel,
    sequences: Tensor,
    batch_size: int = 8,
    all_tokens: bool = False,
    grad_selection: bool = False,
) -> SpliceMetrics:
    """Reconstruction metrics and CE / KL with the SAE spliced into the model over `sequences` [n, T].

    `all_tokens=True` also splices the SAE in at massive-norm outliers (reported as ce_loss_all_tokens).
    A transcoder reads its input hook and is spliced in at its output hook (`cfg.hook_name_out`): its
    prediction replaces that hook's activations, and the zero ablation zeroes them.
    `grad_selection`: a gsae selects its latents as in training, with the LM loss's gradients at its hook on
    each batch (a backward pass through the clean model), instead of as TopK.
    """
    hook = sae.cfg.hook_name
    width = model.hook_width(hook)
    if width != sae.d_in:
        raise DataError(f"SAE d_in = {sae.d_in} does not match hook {hook!r} of {model.name} (width {width})")
    if sae.cfg.transcoder and model.hook_width(sae.cfg.hook_name_out) != sae.d_out:
        out = sae.cfg.hook_name_out
        raise DataError(f"transcoder d_out = {sae.d_out} does not match hook {out!r} of {model.name}")
    if grad_selection and sae.cfg.sparsifier != "gsae":
        raise DataError(f"grad_selection applies to a gsae; this SAE is {sae.cfg.sparsifier}")
    desc = "eval (SAE spliced in)"
    (out,) = _splice_each_source(sae, [(model, hook)], sequences, batch_size, all_tokens, desc, grad_selection)
    return out


@torch.no_grad()
def crosscoder_spliced_metrics(
    cc: SAE, sources: Sequence[tuple[LanguageModel, str]], sequences: Tensor, batch_size: int = 8
) -> list[SpliceMetrics]:
    """Per source: reconstruction metrics and CE / KL with that source's reconstruction spliced in.

    The crosscoder encodes all sources' clean activations of a batch jointly; each source's model is
    then run with its own slice of the reconstruction at its hook (massive-norm tokens, by joint norm
    as in training, pass through).
    """
    if len(sources) != cc.cfg.n_sources:
        raise DataError(f"the crosscoder reads {cc.cfg.n_sources} sources; {len(sources)} given")
    width = check_sources(sources)
    if width * len(sources) != cc.d_in:
        raise DataError(f"crosscoder d_in = {cc.d_in} does not match {len(sources)} sources of width {width}")
    per_source = _splice_each_source(cc, sources, sequences, batch_size, False, "eval (crosscoder spliced in)")
    for (model, hook), result in zip(sources, per_source, strict=True):
        result.source = f"{model.name}@{hook}"
    return per_source


def _splice_each_source(
    sae: SAE, sources: Sequence[tuple[LanguageModel, str]], sequences: Tensor, batch_size: int, all_tokens: bool,
    desc: str, grad_selection: bool = False,
) -> list[SpliceMetrics]:  # fmt: skip
    """Reconstruction and CE / KL metrics per source.

    Each batch's clean activations of all sources are encoded jointly (one source: an SAE); each
    source's model then runs with its slice of the reconstruction at its hook, massive-norm tokens (by
    joint norm, as in training) passing through unless `all_tokens` adds a run that splices them too.
    Up to the hook a spliced run equals the clean one, so the clean pass, which also gives the clean
    logits, yields the activations the spliced model would encode there.
    """
    sae.eval()
    S, device = len(sources), next(sae.parameters()).device
    out_hook = sae.cfg.hook_name_out  # a transcoder (one source) writes there
    stats = [_ReconStats(sae.d_sae, device, sae.d_out // S) for _ in sources]
    losses = [NextTokenLoss() for _ in sources]
    n_tok = n_outliers = 0
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch"):
        toks = sequences[start : start + batch_size]
        grabbed: list[dict[str, Tensor]] = [{} for _ in sources]
        clean = [
            model.run_with_hooks(toks, [(h, _grab(g, h)) for h in (hook, out_hook) if h])
            for (model, hook), g in zip(sources, grabbed, strict=True)
        ]
        x = torch.cat([g[h].reshape(toks.numel(), -1) for g, (_, h) in zip(grabbed, sources, strict=True)], dim=1)
        x = x.to(device, torch.float32)
        keep = keep_mask(x, sae.cfg.exclude_norm_above)
        grad = None
        if grad_selection:  # a gsae (one source); the backward pass enables autograd itself
            grad = sources[0][0].activations_and_grads(toks, sources[0][1])[1].reshape(len(x), -1).to(x)
        codes = sae.encode(x, grad)
        recon = (sae.decode(codes) + sae.skip(x)).reshape(len(x), S, -1)
        per_source = (grabbed[0][out_hook].reshape(len(x), -1).to(x) if out_hook else x).view(len(x), S, -1)
        for s, (model, hook) in enumerate(sources):
            hook = out_hook or hook
            stats[s].update(per_source[keep, s], recon[keep, s], codes[keep])
            runs = {"sae": _put(recon[:, s], keep), "zero": _put(torch.zeros_like(recon[:, s]), keep)}
            if all_tokens:
                runs["all"] = _put(recon[:, s], torch.ones_like(keep))
            losses[s].clean(clean[s], toks)
            for name, fn in runs.items():  # KL of the zero ablation is not reported
                losses[s].run(name, model.run_with_hooks(toks, [(hook, fn)]), toks, kl=name != "zero")
        n_tok += toks.numel()
        n_outliers += int((~keep).sum())
    results = []
    for st, loss in zip(stats, losses, strict=True):
        clean_ce, sae_ce, zero_ce = loss.mean_ce_clean(), loss.mean_ce("sae"), loss.mean_ce("zero")
        results.append(
            SpliceMetrics(
                **vars(st.metrics()),
                ce_loss_clean=clean_ce,
                ce_loss_sae=sae_ce,
                ce_loss_zero_ablation=zero_ce,
                ce_loss_increase=sae_ce - clean_ce,
                ce_loss_recovered=_recovered(clean_ce, sae_ce, zero_ce),
                kl_div=loss.mean_kl("sae"),
                outlier_frac=n_outliers / max(n_tok, 1),
                eval_tokens=n_tok,
                ce_loss_all_tokens=loss.mean_ce("all") if all_tokens else None,
                kl_div_all_tokens=loss.mean_kl("all") if all_tokens else None,
            )
        )
    return results


def _grab(into: dict[str, Tensor], name: str) -> HookFn:
    """Hook fn keeping the activations it sees under `name`, unchanged (it returns nothing)."""

    def fn(act: Tensor, hook: Any) -> None:
        into[name] = act.detach()

    return fn


def _put(new: Tensor, keep: Tensor) -> HookFn:
    """Hook fn replacing the activations at kept tokens [N] with `new` [N, d]; the others pass through."""

    def fn(act: Tensor, hook: Any) -> Tensor:
        flat = act.reshape(-1, act.shape[-1])
        return torch.where(keep[:, None].to(flat.device), new.to(flat), flat).view_as(act)

    return fn


def _recovered(clean: float, sae: float, zero: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean); NaN when ablating changes nothing (undefined)."""
    gap = zero - clean
    return (zero - sae) / gap if abs(gap) > 1e-6 else math.nan


def evaluate_run(
    run_dir: str | Path,
    model: LanguageModel | None = None,
    data: DataConfig | None = None,
    eval_tokens: int = 20_000,
    all_tokens: bool = False,
) -> EvalResult:
    """Evaluate the SAE saved in `run_dir` on held-out text and write `run_dir/eval.json`."""
    run = RunDir(run_dir)
    sae, data, sources = run.load(model, data)
    model = sources[0][0]
    seqs = token_sequences(model, data, "eval", eval_tokens)
    if len(seqs) == 0:
        raise DataError(f"no held-out text in {data.dataset!r} for evaluation")
    if sae.cfg.n_sources > 1:
        if all_tokens:
            raise DataError("all_tokens is not supported for crosscoders")
        per_source = crosscoder_spliced_metrics(sae, sources, seqs)
    else:
        per_source = [spliced_metrics(sae, model, seqs, all_tokens=all_tokens)]
    last = run.last_metrics()
    result = EvalResult(
        per_source,
        sparsifier=sae.cfg.sparsifier,
        d_sae=sae.d_sae,
        k=sae.cfg.k,
        hook_name=sae.cfg.hook_name,
        dead_frac_train=None if last is None else last.get("dead_frac", math.nan),
    )
    run.write_eval(result.to_dict())
    return result
