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

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import check_sources, keep_mask, load_cross_sources, token_sequences
from saelab.config import DataConfig, from_dict
from saelab.models import HookFn, LanguageModel
from saelab.sae import SAE

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


def density_histogram(firing_rate: Tensor, bins: int = 40) -> dict[str, list[float]]:
    """Histogram of log10 firing rates of the latents that fired at all (the usual density plot)."""
    live = firing_rate[firing_rate > 0].double().log10().cpu().numpy()
    counts, edges = np.histogram(live, bins=bins, range=(-7.0, 0.0))
    return {"log10_density_edges": edges.tolist(), "counts": counts.tolist()}


class _ReconStats:
    """Running sums for MSE / FVU / L0 / firing rates over a stream of batches."""

    def __init__(self, d_sae: int, device: torch.device):
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

    def metrics(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no tokens to evaluate on (all were excluded or the text was empty)")
        mean = self.sum_x / self.n
        total_var = self.sum_sq - self.n * float(mean.pow(2).sum())
        rate = self.fired.double() / self.n
        return {
            "tokens": self.n,
            "l0": self.l0_sum / self.n,
            "mse": self.sq_err / self.n,
            "fvu": self.sq_err / max(total_var, 1e-12),
            "dead_frac": float((self.fired == 0).double().mean()),
            "dense_frac": float((rate > DENSE_THRESHOLD).double().mean()),
            "density_histogram": density_histogram(rate),
        }


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """L0, MSE, FVU, dead/dense fractions and the density histogram on activations [N, d_in]."""
    sae.eval()
    keep = keep_mask(acts, sae.cfg.exclude_norm_above)
    stats = _ReconStats(sae.d_sae, acts.device)
    for x in acts[keep].split(batch_size):
        a = sae.encode(x)
        stats.update(x, sae.decode(a), a)
    return stats.metrics()


def next_token_logprobs(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(log-softmax [B, T-1, V], CE per position [B, T-1]) for next-token prediction."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
    return logp, ce


def _ce_kl(
    model: LanguageModel, hook: str, toks: Tensor, runs: list[tuple[str, HookFn]], sums: dict[str, float],
    clean_logits: Tensor,
) -> int:  # fmt: skip
    """Add one batch's summed CE of the clean model (from its `clean_logits`) and of each run (its hook
    fn at `hook`), and KL(clean || run) for every run but 'zero', into `sums`; returns the number of
    predictions."""
    logp_clean, ce = next_token_logprobs(clean_logits, toks)
    sums["ce_clean"] = sums.get("ce_clean", 0.0) + float(ce.sum())
    p_clean = logp_clean.exp()
    for name, fn in runs:
        logp, ce = next_token_logprobs(model.run_with_hooks(toks, [(hook, fn)]), toks)
        sums[f"ce_{name}"] = sums.get(f"ce_{name}", 0.0) + float(ce.sum())
        if name != "zero":
            kl = "kl" if name == "sae" else f"kl_{name}"
            sums[kl] = sums.get(kl, 0.0) + float((p_clean * (logp_clean - logp)).sum())
    return ce.numel()


def _ce_summary(avg: dict[str, float]) -> dict[str, float]:
    return {
        "ce_loss_clean": avg["ce_clean"],
        "ce_loss_sae": avg["ce_sae"],
        "ce_loss_zero_ablation": avg["ce_zero"],
        "ce_loss_increase": avg["ce_sae"] - avg["ce_clean"],
        "ce_loss_recovered": _recovered(avg["ce_clean"], avg["ce_sae"], avg["ce_zero"]),
        "kl_div": avg["kl"],
    }


@torch.no_grad()
def spliced_metrics(
    sae: SAE, model: LanguageModel, sequences: Tensor, batch_size: int = 8, all_tokens: bool = False
) -> dict[str, Any]:
    """Reconstruction metrics and CE / KL with the SAE spliced into the model over `sequences` [n, T].

    `all_tokens=True` also splices the SAE in at massive-norm outliers (reported as ce_loss_all_tokens).
    """
    hook = sae.cfg.hook_name
    width = model.hook_width(hook)
    if width != sae.d_in:
        raise ValueError(f"SAE d_in = {sae.d_in} does not match hook {hook!r} of {model.name} (width {width})")
    desc = "eval (SAE spliced in)"
    (out,), n_tok = _splice_each_source(sae, [(model, hook)], sequences, batch_size, all_tokens, desc)
    if all_tokens:
        out |= {"ce_loss_all_tokens": out.pop("ce_all"), "kl_div_all_tokens": out.pop("kl_all")}
    return out | {"eval_tokens": n_tok}


@torch.no_grad()
def crosscoder_spliced_metrics(
    cc: SAE, sources: Sequence[tuple[LanguageModel, str]], sequences: Tensor, batch_size: int = 8
) -> dict[str, Any]:
    """Per source: reconstruction metrics and CE / KL with that source's reconstruction spliced in.

    The crosscoder encodes all sources' clean activations of a batch jointly; each source's model is
    then run with its own slice of the reconstruction at its hook (massive-norm tokens, by joint norm
    as in training, pass through).
    """
    if len(sources) != cc.cfg.n_sources:
        raise ValueError(f"the crosscoder reads {cc.cfg.n_sources} sources; {len(sources)} given")
    width = check_sources(sources)
    if width * len(sources) != cc.d_in:
        raise ValueError(f"crosscoder d_in = {cc.d_in} does not match {len(sources)} sources of width {width}")
    per_source, n_tok = _splice_each_source(cc, sources, sequences, batch_size, False, "eval (crosscoder spliced in)")
    return {"per_source": [{"source": f"{m.name}@{h}"} | r for (m, h), r in zip(sources, per_source, strict=True)],
            "eval_tokens": n_tok}  # fmt: skip


def _splice_each_source(
    sae: SAE, sources: Sequence[tuple[LanguageModel, str]], sequences: Tensor, batch_size: int, all_tokens: bool,
    desc: str,
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Reconstruction and CE / KL metrics per source, and the number of tokens seen.

    Each batch's clean activations of all sources are encoded jointly (one source: an SAE); each
    source's model then runs with its slice of the reconstruction at its hook, massive-norm tokens (by
    joint norm, as in training) passing through unless `all_tokens` adds a run that splices them too.
    Up to the hook a spliced run equals the clean one, so the clean pass, which also gives the clean
    logits, yields the activations the spliced model would encode there.
    """
    sae.eval()
    S, device = len(sources), next(sae.parameters()).device
    stats = [_ReconStats(sae.d_sae, device) for _ in sources]
    sums: list[dict[str, float]] = [{} for _ in sources]
    n_pred = n_tok = n_outliers = 0
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch"):
        toks = sequences[start : start + batch_size]
        grabbed: list[list[Tensor]] = [[] for _ in sources]
        clean = [
            model.run_with_hooks(toks, [(hook, lambda act, hook, g=g: g.append(act.detach()))])
            for (model, hook), g in zip(sources, grabbed, strict=True)
        ]
        x = torch.cat([g[0].reshape(toks.numel(), -1) for g in grabbed], dim=1).to(device, torch.float32)
        keep = keep_mask(x, sae.cfg.exclude_norm_above)
        codes = sae.encode(x)
        recon = sae.decode(codes).reshape(len(x), S, -1)
        per_source = x.view(len(x), S, -1)
        for s, (model, hook) in enumerate(sources):
            stats[s].update(per_source[keep, s], recon[keep, s], codes[keep])
            runs = [("sae", _put(recon[:, s], keep)), ("zero", _put(torch.zeros_like(recon[:, s]), keep))]
            runs += [("all", _put(recon[:, s], torch.ones_like(keep)))] if all_tokens else []
            n = _ce_kl(model, hook, toks, runs, sums[s], clean_logits=clean[s])
        n_pred += n
        n_tok += toks.numel()
        n_outliers += int((~keep).sum())
    results = []
    for st, sm in zip(stats, sums, strict=True):
        avg = {k: v / max(n_pred, 1) for k, v in sm.items()}
        extra = {k: avg[k] for k in ("ce_all", "kl_all") if k in avg}
        results.append(st.metrics() | _ce_summary(avg) | {"outlier_frac": n_outliers / max(n_tok, 1)} | extra)
    return results, n_tok


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


def data_config_for(run_dir: Path, sae: SAE) -> DataConfig:
    """The data config a run trained with (train_config.json), else one built from the SAE's metadata."""
    path = run_dir / "train_config.json"
    if path.is_file():
        return from_dict(DataConfig, json.loads(path.read_text())["data"], prefix="data.")
    if not sae.cfg.model_name or not sae.cfg.hook_name:
        raise ValueError(f"{run_dir}: no train_config.json and the SAE's cfg.json names no model/hook")
    return DataConfig(model=sae.cfg.model_name, hook_name=sae.cfg.hook_name)


def evaluate_run(
    run_dir: str | Path,
    model: LanguageModel | None = None,
    data: DataConfig | None = None,
    eval_tokens: int = 20_000,
    all_tokens: bool = False,
) -> dict[str, Any]:
    """Evaluate the SAE saved in `run_dir` on held-out text and write `run_dir/eval.json`."""
    from saelab.models import load_model

    run_dir = Path(run_dir)
    sae = SAE.load(run_dir)
    data = data or data_config_for(run_dir, sae)
    model = model or load_model(data.model, data.device)
    sae.to(model.device)
    seqs = token_sequences(model, data, "eval", eval_tokens)
    if len(seqs) == 0:
        raise ValueError(f"no held-out text in {data.dataset!r} for evaluation")
    if sae.cfg.n_sources > 1:
        if all_tokens:
            raise ValueError("all_tokens is not supported for crosscoders")
        sources = [(model, sae.cfg.hook_name or data.hook_name), *load_cross_sources(model, data)]
        result = crosscoder_spliced_metrics(sae, sources, seqs)
    else:
        result = spliced_metrics(sae, model, seqs, all_tokens=all_tokens)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
        if lines:
            result["dead_frac_train"] = json.loads(lines[-1]).get("dead_frac", math.nan)
    result |= {"sparsifier": sae.cfg.sparsifier, "d_sae": sae.d_sae, "k": sae.cfg.k, "hook_name": sae.cfg.hook_name}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


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
    ("outlier_frac", "massive-norm tokens passed through"),
    ("eval_tokens", "held-out tokens"),
)


def format_table(result: dict[str, Any]) -> str:
    """The eval metrics as an aligned two-column text table (one per source for a crosscoder)."""
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
