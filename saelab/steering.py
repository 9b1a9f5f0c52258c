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

A transcoder's latents write at its output hook (`cfg.hook_name_out`), so `Add` acts there; `Clamp` reads
the latents from the input hook and changes the output hook's activations by (value - a_f) * W_dec[f].
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
from saelab.store.records import BASELINE_KIND

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


def _hook_of(sae: SAE, hook_name: str | None, writes: bool = False) -> str:
    """The hook an SAE intervention acts on: where the SAE reads, or (`writes`) where its latents write,
    which for a transcoder is its output hook."""
    trained = sae.cfg.hook_name_out if writes and sae.cfg.transcoder else sae.cfg.hook_name
    if hook_name and trained and hook_name != trained:
        raise DataError(f"this SAE was trained on {trained!r}; it has no meaning at hook {hook_name!r}")
    hook = hook_name or trained
    if not hook:
        raise DataError("the SAE's cfg names no hook point; pass hook_name=")
    return hook


def _in_units(amounts: list[float], ids: list[int], units: str, max_acts: Any, sae: SAE) -> Tensor:
    """Amounts as activations: as given (`units="raw"`), or times each feature's max activation ("max")."""
    out = torch.tensor(amounts, dtype=sae.W_dec.dtype)
    if units == "max":
        if max_acts is None:
            raise DataError("units='max' needs max_acts (for example FeatureStore.max_acts(sae_id))")
        maxes = torch.as_tensor(max_acts, dtype=out.dtype)
        if maxes.shape != (sae.d_sae,):
            raise DataError(f"max_acts must have shape [{sae.d_sae}], got {tuple(maxes.shape)}")
        out = out * maxes[ids].nan_to_num(0.0)
    elif units != "raw":
        raise DataError(f"units must be 'raw' or 'max', got {units!r}")
    return out.to(sae.W_dec.device)


def _directions(sae: SAE, ids: list[int], source: int | None) -> Tensor:
    """Decoder directions [len(ids), d] in the model's units; for a crosscoder `source`, that source's part."""
    dirs = sae.decoder_directions()[ids]
    if source is None:
        return dirs
    n = sae.cfg.n_sources
    if n < 2:
        raise DataError("source= picks one source of a crosscoder; this SAE reads one source")
    if not 0 <= source < n:
        raise DataError(f"source {source} is out of range: the crosscoder reads sources 0 .. {n - 1}")
    d = sae.cfg.d_in
    return dirs[:, source * d : (source + 1) * d]


def _sae_width(iv: Any) -> int:
    """Width of the hook an SAE intervention acts on: where the SAE writes (a transcoder's output hook), or one
    crosscoder source's."""
    if getattr(iv, "source", None) is not None:
        return iv.sae.cfg.d_in
    return iv.sae.d_out


class _OneHook:
    """An intervention acting at one hook point: `hook()`, with the function `prepare(width)` builds."""

    def hook(self) -> str:
        raise NotImplementedError

    def prepare(self, width: int) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def hooks(self, width: int) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """(hook, function) pairs to attach for every forward pass, in the order they fire."""
        return [(self.hook(), self.prepare(width))]


@dataclass(frozen=True)
class Add(_OneHook):
    """Add `strength` x each feature's decoder direction (see the module docstring for `units`)."""

    sae: SAE
    features: Features
    strength: Amounts
    units: str = "raw"
    """'raw' (activation units) or 'max' (multiples of each feature's typical max activation)."""
    max_acts: Any = None
    """Per-feature max activations [d_sae] for units='max' (`FeatureStore.max_acts(sae_id)`)."""
    hook_name: str | None = None
    source: int | None = None
    """Crosscoders: add the latents' decoder directions for this source only, at its hook (`hook_name`)
    in its model, to steer one of the models a crosscoder reads."""

    def hook(self) -> str:
        """Hook point this intervention acts on."""
        if self.source is not None:  # a source's hook; the crosscoder's cfg names only the first
            if not self.hook_name:
                raise DataError("steering one crosscoder source needs that source's hook_name")
            return self.hook_name
        return _hook_of(self.sae, self.hook_name, writes=True)

    def delta(self) -> Tensor:
        """The vector [d_in] added at every ordinary token."""
        ids = _feature_ids(self.sae, self.features)
        amounts = _in_units(_amounts(self.strength, len(ids), "strength"), ids, self.units, self.max_acts, self.sae)
        return amounts @ _directions(self.sae, ids, self.source)

    def prepare(self, width: int) -> Callable[[Tensor], Tensor]:
        """Validate once and return the function applied at every forward pass."""
        delta, threshold = self.delta(), self.sae.write_norm_threshold

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
    units: str = "raw"
    """'raw' (activations) or 'max' (multiples of each feature's max activation, as for `Add`)."""
    max_acts: Any = None

    def hook(self) -> str:
        """Hook point this intervention acts on (a transcoder's output hook, where its latents write)."""
        return _hook_of(self.sae, self.hook_name, writes=True)

    def targets(self) -> tuple[list[int], Tensor]:
        """Feature ids and the activation each is set to."""
        ids = _feature_ids(self.sae, self.features)
        vals = _amounts(self.values, len(ids), "clamp value")
        if not self.sae.sparsifier.signed and min(vals) < 0:
            raise DataError(
                f"clamp values must be >= 0 for a {self.sae.cfg.sparsifier} SAE (its features never go negative)"
            )
        return ids, _in_units(vals, ids, self.units, self.max_acts, self.sae)

    def prepare(self, width: int) -> Callable[[Tensor], Tensor]:
        """Validate once and return the function applied at every forward pass (for a transcoder, `hooks`
        also reads its input hook first)."""
        return self.hooks(width)[-1][1]

    def hooks(self, width: int) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """(hook, function) pairs of every forward pass, in the order they fire: an SAE's one; a transcoder's
        latents are read at its input hook and changed at its output hook."""
        ids, new = self.targets()
        sae, directions = self.sae, self.sae.decoder_directions()[ids]
        inputs: list[Tensor] = []  # a transcoder's input activations of the pass under way

        def read(act: Tensor) -> Tensor:
            inputs[:] = [act.reshape(-1, act.shape[-1])]
            return act

        def fn(act: Tensor) -> Tensor:
            flat = act.reshape(-1, act.shape[-1])
            if sae.cfg.transcoder and (not inputs or len(inputs[0]) != len(flat)):
                raise DataError(f"{sae.cfg.hook_name!r} did not fire before {sae.cfg.hook_name_out!r} in this pass")
            src = inputs.pop() if sae.cfg.transcoder else flat
            keep = keep_mask(src, sae.cfg.exclude_norm_above)
            delta = (new - sae.encode(src[keep].to(sae.W_dec.device))[:, ids]) @ directions
            out = flat.clone()
            out[keep] = (flat[keep].to(delta) + delta).to(flat.dtype)
            return out.view_as(act)

        return ([(sae.cfg.hook_name, read)] if sae.cfg.transcoder else []) + [(self.hook(), fn)]

    def apply(self, act: Tensor, inputs: Tensor | None = None) -> Tensor:
        """The activations [..., d] with the chosen features set and everything else kept (a transcoder's
        output activations, given its `inputs` on the same tokens)."""
        fns = self.hooks(act.shape[-1])
        if self.sae.cfg.transcoder:
            if inputs is None:
                raise DataError("a transcoder's latents come from its input: pass inputs=")
            fns[0][1](inputs)
        return fns[-1][1](act)


def Ablate(sae: SAE, features: Features, hook_name: str | None = None) -> Clamp:
    """Zero features through the SAE, keeping its reconstruction error (a `Clamp` to 0)."""
    return Clamp(sae, features, 0.0, hook_name)


@dataclass(frozen=True)
class AddVector(_OneHook):
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
        if getattr(iv, "sae", None) is not None and width != _sae_width(iv):
            raise DataError(f"SAE input width {_sae_width(iv)} does not match hook {hook!r} (width {width})")
        for name, fn in iv.hooks(width):
            by_hook.setdefault(name, []).append(fn)
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
    """Continue `prompt` (greedy when temperature is 0, else sampled with `seed`); returns the new text.

    Stops at EOS. Earlier positions' keys and values are cached (`LanguageModel.incremental_forward`),
    so each new token costs a pass over that token alone, and the interventions see only the new
    positions. That gives the tokens of rerunning the whole sequence for every token because each
    intervention changes a position from that position's activations alone; a `Clamp` through an SAE
    whose codes depend on the rest of the batch (mutualchoice, or batchtopk / featurechoice in training
    mode) is not such an intervention, and then every token reruns the whole sequence, as it was defined.
    """
    ids = model.tokenize([prompt])[0]
    if not ids:
        raise DataError("empty prompt")
    model.check_length(len(ids) + max_new_tokens, f"the prompt with {max_new_tokens} new tokens")
    step = model.incremental_forward(use_cache=all(_acts_per_position(iv) for iv in interventions))
    gen = torch.Generator().manual_seed(seed)
    new: list[int] = []
    pending = torch.tensor([ids])  # tokens not yet run: the prompt, then the latest token
    with torch.no_grad(), intervene(model, interventions):
        while len(new) < max_new_tokens:
            logits = step(pending)[0, -1].float().cpu()
            if temperature > 0:
                nxt = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
            else:
                nxt = int(logits.argmax(-1))
            new.append(nxt)
            if nxt == model.tokenizer.eos_token_id:
                break
            pending = torch.tensor([[nxt]])
    return model.tokenizer.decode(new)


def _acts_per_position(iv: Intervention) -> bool:
    """Whether `iv` changes each position from that position's activations alone (see `generate`)."""
    return not isinstance(iv, Clamp) or iv.sae.sparsifier.codes_tokens_alone


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
def promoted_tokens(model: LanguageModel, sae: SAE, feature: int, n: int = 5, source: int | None = None) -> list[int]:
    """Token ids the feature's decoder direction (a crosscoder's: in `source`) most promotes through the
    unembedding."""
    (f,) = _feature_ids(sae, feature)
    return model.direction_logits(_directions(sae, [f], source)).topk(n, dim=-1).indices[0].tolist()


def parse_targets(model: LanguageModel, text: str) -> list[int] | None:
    """Token ids of target tokens written `' king| queen'` ('|'-separated, spaces kept: they are part of
    the token); None when none are given. Each must be one token of the model's vocabulary."""
    ids = []
    for piece in filter(None, text.split("|")):
        (tokens,) = model.tokenize([piece])
        if len(tokens) != 1:
            raise DataError(
                f"target {piece!r} is {len(tokens)} tokens in {model.name} "
                f"({[model.tokenizer.decode([t]) for t in tokens]}); give single tokens"
            )
        ids.append(tokens[0])
    return ids or None


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
    targets: Sequence[int] | None = None,
    baseline: Tensor | None = None,
    source: int | None = None,
    hook_name: str | None = None,
) -> Any:
    """Steer with each feature at each strength; a tidy DataFrame with one row per (kind, feature, strength).

    kind 'add' adds strength x the decoder direction, 'clamp' sets the feature to strength (both in
    `units`, as in `Add`), 'ablate' zeroes it (one row per feature, strength 0). The effect is measured
    on `targets` (token ids), else on each feature's `n_targets` most promoted tokens. With a `baseline`
    vector [d] (e.g. `diff_in_means`), rows of kind `BASELINE_KIND` add it at each strength, scaled per
    feature to the size of that feature's direction at strength 1 in `units`: the two compared at equal
    intervention size. `source` / `hook_name` steer one source of a crosscoder (kind 'add', as `Add`).
    """
    import pandas as pd

    if kind not in ("add", "clamp", "ablate"):
        raise DataError(f"kind must be 'add', 'clamp' or 'ablate', got {kind!r}")
    if source is not None and kind != "add":
        raise DataError("a crosscoder source can only be steered with 'add' (clamping needs every source at once)")
    if baseline is not None and kind == "ablate":
        raise DataError("the difference-in-means baseline is compared with 'add' or 'clamp' sweeps")
    ids = _feature_ids(sae, list(features))
    strengths = [0.0] if kind == "ablate" else _amounts(list(strengths), len(strengths), "strength")
    if not strengths:
        raise DataError("give at least one strength")
    hook = hook_name or _hook_of(sae, None, writes=True)
    settings: dict[Any, list[Intervention]] = {}
    aims: dict[Any, list[int]] = {}
    for f in ids:
        aim = list(targets) if targets else promoted_tokens(model, sae, f, n_targets, source)
        for s in strengths:
            if kind == "add":
                iv: Intervention = Add(sae, f, s, units, max_acts, hook_name, source)
            else:
                iv = Clamp(sae, f, s, hook_name, units, max_acts)
            settings[(kind, f, s)], aims[(kind, f, s)] = [iv], aim
        if baseline is not None:
            size = _in_units([1.0], [f], units, max_acts, sae) @ _directions(sae, [f], source)
            vector = baseline.to(size) * (size.norm() / baseline.norm().clamp_min(1e-12))
            for s in strengths:
                settings[(BASELINE_KIND, f, s)], aims[(BASELINE_KIND, f, s)] = [AddVector(hook, vector, s)], aim
    effects = steering_effects(model, sequences, settings, aims, batch_size)
    vocab = model.tokenizer
    rows = [
        {"feature": f, "strength": s, "kind": k, "units": units}
        | effects[(k, f, s)].to_dict()
        | {"targets": "|".join(vocab.decode([t]) for t in aims[(k, f, s)])}
        for k, f, s in settings
    ]
    return pd.DataFrame(rows)
