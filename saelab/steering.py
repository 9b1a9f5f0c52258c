"""Steering: add, clamp or ablate SAE features (or add any vector) inside the model, and measure it.

Interventions are plain values; `intervene(model, [...])` attaches them as forward hooks for the
duration of a `with` block and always removes them. Several interventions, on one or several hook
points, compose in the order given.

- `Add(sae, features, strength)`: add strength x the feature's decoder direction to the residual
  stream, in activation units (`units="raw"`) or in multiples of the feature's typical max
  activation (`units="max"`, with `max_acts` from the feature store: `FeatureStore.max_acts`).
- `Clamp(sae, features, values)`: set the features' activations through the SAE while keeping its
  reconstruction error, so only those features change: x + (value - a_f) * W_dec[f] / act_scale.
- `Ablate(sae, features)`: clamp to zero.
- `AddVector(hook_name, vector, strength)`: add any direction, e.g. `diff_in_means(...)`, the
  supervised baseline the AbsTopK paper compares SAE steering against.

Like the SAE splice in `saelab.evals`, SAE interventions leave massive-norm tokens (attention sinks)
untouched. Signed SAEs (abstopk) accept negative strengths and clamp values, steering both ways.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import keep_mask
from saelab.errors import DataError, check_feature_id
from saelab.models import LanguageModel
from saelab.nexttoken import NextTokenLoss
from saelab.results import SteeringEffect
from saelab.sae import SAE

Features = int | Sequence[int]
Amounts = float | Sequence[float]


def _as_list(x: Any) -> list:
    if isinstance(x, (Tensor, np.ndarray)):
        return x.reshape(-1).tolist()
    return list(x) if isinstance(x, (list, tuple, range)) else [x]


def _feature_ids(sae: SAE, features: Features) -> list[int]:
    ids = [check_feature_id(f, sae.d_sae) for f in _as_list(features)]
    if not ids:
        raise DataError("no features given")
    return ids


def _amounts(values: Amounts, n: int, what: str) -> list[float]:
    vals = [float(v) for v in _as_list(values)]
    if len(vals) == 1:
        vals *= n
    if len(vals) != n:
        raise DataError(f"{len(vals)} {what}s for {n} features; give one, or one per feature")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise DataError(f"{what} must be finite, got {bad[0]}")
    return vals


def _hook_of(sae: SAE, hook_name: str | None) -> str:
    trained = sae.cfg.hook_name
    if hook_name and trained and hook_name != trained:
        raise DataError(f"this SAE was trained on {trained!r}; it has no meaning at hook {hook_name!r}")
    hook = hook_name or trained
    if not hook:
        raise DataError("the SAE's cfg names no hook point; pass hook_name=")
    return hook


@dataclass(frozen=True)
class Add:
    """Add `strength` x each feature's decoder direction (see the module docstring for `units`)."""

    sae: SAE
    features: Features
    strength: Amounts
    units: str = "raw"
    """'raw' (activation units) or 'max' (multiples of each feature's typical max activation)."""
    max_acts: Any = None
    """Per-feature max activations [d_sae] for units='max' (`FeatureStore.max_acts(sae_id)`)."""
    hook_name: str | None = None

    def hook(self) -> str:
        """Hook point this intervention acts on."""
        return _hook_of(self.sae, self.hook_name)

    def delta(self) -> Tensor:
        """The vector [d_in] added at every ordinary token."""
        ids = _feature_ids(self.sae, self.features)
        amounts = torch.tensor(_amounts(self.strength, len(ids), "strength"), dtype=self.sae.W_dec.dtype)
        if self.units == "max":
            if self.max_acts is None:
                raise DataError("units='max' needs max_acts (for example FeatureStore.max_acts(sae_id))")
            maxes = torch.as_tensor(self.max_acts, dtype=amounts.dtype)
            if maxes.shape != (self.sae.d_sae,):
                raise DataError(f"max_acts must have shape [{self.sae.d_sae}], got {tuple(maxes.shape)}")
            amounts = amounts * maxes[ids].nan_to_num(0.0)
        elif self.units != "raw":
            raise DataError(f"units must be 'raw' or 'max', got {self.units!r}")
        return amounts.to(self.sae.W_dec.device) @ self.sae.decoder_directions()[ids]

    def prepare(self, width: int) -> Callable[[Tensor], Tensor]:
        """Validate once and return the function applied at every forward pass."""
        delta, threshold = self.delta(), self.sae.cfg.exclude_norm_above

        def fn(act: Tensor) -> Tensor:
            return act + keep_mask(act, threshold)[..., None] * delta.to(act.dtype)

        return fn

    def apply(self, act: Tensor) -> Tensor:
        """The activations [..., d] with the intervention applied."""
        return self.prepare(act.shape[-1])(act)


@dataclass(frozen=True)
class Clamp:
    """Set features' activations to `values` through the SAE, keeping its reconstruction error."""

    sae: SAE
    features: Features
    values: Amounts
    hook_name: str | None = None

    def hook(self) -> str:
        """Hook point this intervention acts on."""
        return _hook_of(self.sae, self.hook_name)

    def targets(self) -> tuple[list[int], Tensor]:
        """Feature ids and the activation each is set to."""
        ids = _feature_ids(self.sae, self.features)
        vals = _amounts(self.values, len(ids), "clamp value")
        if not self.sae.sparsifier.signed and min(vals) < 0:
            raise DataError(
                f"clamp values must be >= 0 for a {self.sae.cfg.sparsifier} SAE (its features never go negative)"
            )
        return ids, torch.tensor(vals, dtype=self.sae.W_dec.dtype, device=self.sae.W_dec.device)

    def prepare(self, width: int) -> Callable[[Tensor], Tensor]:
        """Validate once and return the function applied at every forward pass."""
        ids, new = self.targets()
        sae, directions = self.sae, self.sae.decoder_directions()[ids]

        def fn(act: Tensor) -> Tensor:
            flat = act.reshape(-1, act.shape[-1])
            keep = keep_mask(flat, sae.cfg.exclude_norm_above)
            x = flat[keep].to(sae.W_dec.device)
            delta = (new - sae.encode(x)[:, ids]) @ directions
            out = flat.clone()
            out[keep] = (x + delta).to(flat.dtype)
            return out.view_as(act)

        return fn

    def apply(self, act: Tensor) -> Tensor:
        """The activations [..., d] with the chosen features set and everything else kept."""
        return self.prepare(act.shape[-1])(act)


def Ablate(sae: SAE, features: Features, hook_name: str | None = None) -> Clamp:
    """Zero features through the SAE, keeping its reconstruction error (a `Clamp` to 0)."""
    return Clamp(sae, features, 0.0, hook_name)


@dataclass(frozen=True)
class AddVector:
    """Add `strength` x `vector` [d] at a hook point (e.g. a difference-in-means direction)."""

    hook_name: str
    vector: Tensor
    strength: float = 1.0

    def hook(self) -> str:
        """Hook point this intervention acts on."""
        return self.hook_name

    def prepare(self, width: int) -> Callable[[Tensor], Tensor]:
        """Validate once and return the function applied at every forward pass."""
        (strength,) = _amounts(self.strength, 1, "strength")
        if self.vector.shape != (width,):
            raise DataError(f"vector has shape {tuple(self.vector.shape)}; hook {self.hook_name!r} has width {width}")
        vector = strength * self.vector

        def fn(act: Tensor) -> Tensor:
            return act + vector.to(act.device, act.dtype)

        return fn

    def apply(self, act: Tensor) -> Tensor:
        """The activations [..., d] plus strength x vector."""
        return self.prepare(act.shape[-1])(act)


Intervention = Add | Clamp | AddVector


Prepared = dict[str, list[Callable[[Tensor], Tensor]]]


def _prepare(model: LanguageModel, interventions: Sequence[Intervention]) -> Prepared:
    """Check every intervention against the model and build its per-pass function, grouped by hook.

    Everything is validated here, so bad feature ids, strengths or shapes fail before the model runs.
    """
    by_hook: Prepared = {}
    for iv in interventions:
        hook = iv.hook()
        width = model.hook_width(hook)
        sae = getattr(iv, "sae", None)
        if sae is not None and width != sae.d_in:
            raise DataError(f"SAE d_in = {sae.d_in} does not match hook {hook!r} (width {width})")
        by_hook.setdefault(hook, []).append(iv.prepare(width))
    return by_hook


@contextlib.contextmanager
def _hooked(model: LanguageModel, prepared: Prepared) -> Iterator[None]:
    def make(fns: list[Callable[[Tensor], Tensor]]) -> Any:
        def fn(act: Tensor, hook: Any) -> Tensor:
            with torch.no_grad():
                for f in fns:
                    act = f(act)
            return act

        return fn

    with model.hooked([(hook, make(fns)) for hook, fns in prepared.items()]):
        yield


@contextlib.contextmanager
def intervene(model: LanguageModel, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Apply `interventions` to every forward pass of `model` inside the block; hooks always come off."""
    with _hooked(model, _prepare(model, interventions)):
        yield


@torch.no_grad()
def diff_in_means(
    model: LanguageModel,
    hook_name: str,
    positive: Sequence[str],
    negative: Sequence[str],
    exclude_norm_above: float = 0.0,
    last_token_only: bool = False,
) -> Tensor:
    """Mean activation over the `positive` prompts minus that over the `negative` ones [d].

    Averages every token of each prompt, or only each prompt's last token (`last_token_only`, for
    prompts that end where the concept is). Tokens with norms above `exclude_norm_above` (> 0) are
    left out, so attention sinks do not dominate the means.
    """
    means = []
    for name, prompts in (("positive", positive), ("negative", negative)):
        rows = []
        for ids in model.tokenize(list(prompts)):
            if ids:
                acts = model.activations(torch.tensor([ids]), hook_name)[0].float()
                acts = acts[-1:] if last_token_only else acts
                rows.append(acts[keep_mask(acts, exclude_norm_above)])
        if not rows or not sum(len(r) for r in rows):
            raise DataError(f"no usable tokens in the {name} prompts")
        means.append(torch.cat(rows).mean(0))
    return means[0] - means[1]


@torch.no_grad()
def parse_features(text: str, d_sae: int) -> list[tuple[int, float]]:
    """Features and strengths written `ID:STRENGTH,ID:STRENGTH` (a bare `ID` means strength 1), as in the
    app's steering URL; a clear error names the part that is wrong."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fid, _, amount = part.partition(":")
        try:
            feature = int(fid)
        except ValueError:
            raise DataError(f"{part!r}: {fid!r} is not a feature id (write ID:STRENGTH, e.g. 12:2.5)") from None
        if not 0 <= feature < d_sae:
            raise DataError(f"{part!r}: feature {feature} is out of range: ids run from 0 to {d_sae - 1}")
        try:
            strength = float(amount) if amount.strip() else 1.0
        except ValueError:
            raise DataError(f"{part!r}: strength {amount!r} is not a number") from None
        if not math.isfinite(strength):
            raise DataError(f"{part!r}: strength must be finite")
        out.append((feature, strength))
    if not out:
        raise DataError("name at least one feature to steer with, e.g. 12:2.5")
    return out


def generate(
    model: LanguageModel,
    prompt: str,
    max_new_tokens: int = 30,
    interventions: Sequence[Intervention] = (),
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Continue `prompt` (greedy when temperature is 0, else sampled with `seed`); returns the new text."""
    tokens = torch.tensor([model.tokenize([prompt])[0]])
    if tokens.numel() == 0:
        raise DataError("empty prompt")
    n_prompt = tokens.shape[1]
    gen = torch.Generator().manual_seed(seed)
    with intervene(model, interventions):
        for _ in range(max_new_tokens):
            logits = model.run_with_hooks(tokens)[0, -1].float().cpu()
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt[None]], dim=1)
            if int(nxt) == model.tokenizer.eos_token_id:
                break
    return model.tokenizer.decode(tokens[0, n_prompt:])


def side_by_side(
    model: LanguageModel,
    prompts: Sequence[str],
    interventions: Sequence[Intervention],
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Each prompt's continuation without and with the interventions, under the same seed."""
    rows = []
    for prompt in prompts:
        clean = generate(model, prompt, max_new_tokens, (), temperature, seed)
        steered = generate(model, prompt, max_new_tokens, interventions, temperature, seed)
        rows.append({"prompt": prompt, "clean": clean, "steered": steered})
    return rows


def _target_logprob(logp: Tensor, targets: Sequence[int]) -> Tensor:
    """log P(next token in targets) at each position: logsumexp over the target ids."""
    return logp[..., list(targets)].logsumexp(-1)


@torch.no_grad()
def steering_effects(
    model: LanguageModel,
    sequences: Tensor,
    settings: dict[Any, Sequence[Intervention]],
    targets: dict[Any, Sequence[int]] | None = None,
    batch_size: int = 4,
) -> dict[Any, SteeringEffect]:
    """Cost and effect of each setting (name -> interventions) on held-out `sequences` [n, T].

    Cost: CE loss and KL(clean || steered) per predicted token. Effect: the mean change in log P(next
    token is one of the setting's `targets`). The clean pass runs once per batch and is shared.
    """
    if sequences.ndim != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
        raise DataError(f"sequences must be token ids [n >= 1, T >= 2], got shape {tuple(sequences.shape)}")
    targets = {name: ids for name, ids in (targets or {}).items() if name in settings}
    prepared = {name: _prepare(model, ivs) for name, ivs in settings.items()}
    loss = NextTokenLoss()
    target_sums = {name: [0.0, 0.0] for name in targets}  # steered, clean
    for start in tqdm(range(0, len(sequences), batch_size), desc="steering effects", unit="batch", leave=False):
        toks = sequences[start : start + batch_size]
        logp_clean = loss.clean(model.run_with_hooks(toks), toks)
        for name in settings:
            with _hooked(model, prepared[name]):
                logp = loss.run(name, model.run_with_hooks(toks), toks)
            if name in targets:
                target_sums[name][0] += float(_target_logprob(logp, targets[name]).sum())
                target_sums[name][1] += float(_target_logprob(logp_clean, targets[name]).sum())
    n = loss.n
    out = {}
    for name in settings:
        effect = SteeringEffect(
            ce_loss=loss.mean_ce(name),
            ce_clean=loss.mean_ce_clean(),
            ce_increase=(loss.ce[name] - loss.ce_clean) / n,
            kl=loss.mean_kl(name),
        )
        if name in targets:
            steered, clean = target_sums[name]
            effect.target_logprob, effect.target_logprob_clean = steered / n, clean / n
            effect.delta_logprob = (steered - clean) / n
        out[name] = effect
    return out


@torch.no_grad()
def promoted_tokens(model: LanguageModel, sae: SAE, feature: int, n: int = 5) -> list[int]:
    """Token ids the feature's decoder direction most promotes through the unembedding."""
    (f,) = _feature_ids(sae, feature)
    return model.direction_logits(sae.decoder_directions()[[f]]).topk(n, dim=-1).indices[0].tolist()


def sweep(
    model: LanguageModel,
    sae: SAE,
    features: Sequence[int],
    strengths: Sequence[float],
    sequences: Tensor,
    kind: str = "add",
    units: str = "raw",
    max_acts: Any = None,
    n_targets: int = 5,
    batch_size: int = 4,
) -> Any:
    """Steer with each feature at each strength; a tidy DataFrame with one row per (feature, strength).

    kind 'add' adds strength x the decoder direction (`units` as in `Add`); 'clamp' sets the feature
    to `strength` through the SAE. Targets are each feature's `n_targets` most promoted tokens.
    """
    import pandas as pd

    if kind not in ("add", "clamp"):
        raise DataError(f"kind must be 'add' or 'clamp', got {kind!r}")
    ids = _feature_ids(sae, list(features))
    _amounts(list(strengths), len(strengths), "strength")
    settings: dict[Any, list[Intervention]] = {}
    targets: dict[Any, list[int]] = {}
    for f in ids:
        for s in strengths:
            iv = Add(sae, f, s, units, max_acts) if kind == "add" else Clamp(sae, f, s)
            settings[(f, s)] = [iv]
            targets[(f, s)] = promoted_tokens(model, sae, f, n_targets)
    effects = steering_effects(model, sequences, settings, targets, batch_size)
    vocab = model.tokenizer
    rows = [
        {"feature": f, "strength": s, "kind": kind, "units": units if kind == "add" else "raw"}
        | effects[(f, s)].to_dict()
        | {"targets": "|".join(vocab.decode([t]) for t in targets[(f, s)])}
        for f, s in settings
    ]
    return pd.DataFrame(rows)
