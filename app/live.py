"""What the pages that run the model share: the run's model and SAE, loaded once per server process.

Only live pages import this module (it imports torch); the browsing pages never wait on a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from saelab import steering
from saelab.app import common
from saelab.corpus import token_sequences
from saelab.errors import SaelabError
from saelab.prompt import PromptActivations, run_prompt
from saelab.rundir import LoadedRun, RunDir
from saelab.steering import Ablate, Add, Clamp
from saelab.store import SAEInfo


@st.cache_resource(show_spinner="Loading the model and the SAE ...", max_entries=4)
def _load(run_dir: str, model: str, hook: str, dataset: str) -> LoadedRun:
    # The model and hook the store recorded: an SAE from another library may name none in its files.
    run = RunDir(run_dir)
    return run.load(data=run.data_config(model, hook, dataset or None))


def _key(info: SAEInfo) -> tuple[str, str, str, str]:
    """What `_load` loads `info`'s run by (and caches it under)."""
    return run_dir(info), info.model, info.hook_name, info.params.get("dataset") or ""


def run_dir(info: SAEInfo) -> str:
    """Where `info`'s run directory is: its stored path, or (stores written before paths were stored
    absolute) that path relative to the working directory or to the store's parent directories."""
    stored = Path(info.run_dir)
    if stored.is_absolute():
        return str(stored)
    store = common.store_path().resolve()
    found = [p for p in (Path.cwd() / stored, store.parent.parent / stored, store.parent / stored) if p.is_dir()]
    return str(found[0] if found else stored)


def load_run(info: SAEInfo) -> LoadedRun:
    """The model(s) and SAE `info` was analysed from, or a message saying what is missing and how to fix it."""
    if not info.run_dir:
        common.fail(f"{info.sae_id} was analysed from an SAE in memory, not a run directory: there is no model to run.")
    try:
        return _load(*_key(info))
    except SaelabError as e:
        common.fail(
            f"Cannot load {info.sae_id}'s model and SAE from its run directory {info.run_dir}: {e}. "
            "The browsing pages work without them; to run prompts, put the run directory back at that path "
            "(or analyse it again from where it is now)."
        )


@st.cache_data(max_entries=64, show_spinner=False)
def _prompt(key: tuple[str, str, str, str], text: str) -> PromptActivations:
    loaded = _load(*key)
    return run_prompt(loaded.sae, loaded.sources, text)


def prompt(info: SAEInfo, text: str) -> PromptActivations:
    """The SAE's features at each token of `text` (cached per run and text), or a message on bad input."""
    load_run(info)
    with common.errors():
        return _prompt(_key(info), text)


def _source(info: SAEInfo, source: int) -> tuple[LoadedRun, Any, str]:
    """The run, and the model and hook point of its source `source` (0 for an SAE): the hook where steering
    acts, which for a transcoder is its output hook."""
    run = load_run(info)
    if not 0 <= source < len(run.sources):
        common.fail(f"`src={source}` is out of range: {info.sae_id} reads {len(run.sources)} source(s).")
    model, hook = run.sources[source]
    return run, model, run.sae.cfg.hook_name_out or hook


def _crosscoder_source(run: LoadedRun, source: int) -> int | None:
    """`source` for `saelab.steering` (which steers one source of a crosscoder); None for an SAE."""
    return source if run.sae.cfg.n_sources > 1 else None


def interventions(
    info: SAEInfo, kind: str, units: str, chosen: list[tuple[int, float]], max_acts: Any, source: int = 0
) -> list[Any]:
    """The steering interventions for `chosen` (feature, strength) pairs: one Add, Clamp or Ablate; for a
    crosscoder, an Add of the latents' decoder directions in source `source`'s model."""
    run, _, hook = _source(info, source)
    features, strengths = [f for f, _ in chosen], [v for _, v in chosen]
    if run.sae.cfg.n_sources > 1 and kind != "add":
        common.fail(
            "A crosscoder latent can be added to either model, not clamped or ablated: its activation needs "
            "both models' activations at once. Choose 'add'."
        )
    with common.errors():
        if kind == "add":
            return [Add(run.sae, features, strengths, units, max_acts, hook, _crosscoder_source(run, source))]
        if kind == "clamp":
            return [Clamp(run.sae, features, strengths, units=units, max_acts=max_acts)]
        return [Ablate(run.sae, features)]


def side_by_side(
    info: SAEInfo, prompts: list[str], ivs: list[Any], max_new: int, temperature: float, seed: int, source: int = 0
) -> list[dict[str, str]]:
    """Each prompt's continuation by source `source`'s model without and with the interventions."""
    _, model, _ = _source(info, source)
    return steering.side_by_side(model, prompts, ivs, max_new, temperature, seed)


def targets(info: SAEInfo, text: str, source: int = 0) -> list[int] | None:
    """Token ids of '|'-separated target tokens (None for none given), or a message naming one that is
    not a single token."""
    _, model, _ = _source(info, source)
    with common.errors():
        return steering.parse_targets(model, text)


def sweep(
    info: SAEInfo,
    features: list[int],
    strengths: list[float],
    kind: str,
    units: str,
    max_acts: Any,
    n_tokens: int,
    targets: list[int] | None,
    baseline: tuple[list[str], list[str]] | None,
    source: int = 0,
) -> Any:
    """`saelab.steering.sweep` on `n_tokens` of the run's held-out text, with the difference in means of
    the `baseline` prompt sets (with, without the concept) beside the features when given."""
    run, model, hook = _source(info, source)
    sequences = token_sequences(model, run.data, "eval", n_tokens)
    with common.errors():
        vector = None
        if baseline is not None:
            vector = steering.diff_in_means(model, hook, *baseline, run.sae.write_norm_threshold, last_token_only=True)
        return steering.sweep(
            model, run.sae, features, strengths, sequences, kind, units, max_acts,
            targets=targets, baseline=vector, source=_crosscoder_source(run, source), hook_name=hook,
        )  # fmt: skip
