"""What the pages that run the model share: the run's model and SAE, loaded once per server process.

Only live pages import this module (it imports torch); the browsing pages never wait on a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import streamlit as st

from saelab import steering
from saelab.app import common
from saelab.corpus import token_sequences
from saelab.errors import SaelabError
from saelab.prompt import PromptActivations, run_prompt
from saelab.results import SteeringEffect
from saelab.rundir import LoadedRun, RunDir
from saelab.steering import Ablate, Add, Clamp
from saelab.store import SAEInfo


@st.cache_resource(show_spinner="Loading the model and the SAE ...", max_entries=4)
def _load(run_dir: str) -> LoadedRun:
    return RunDir(run_dir).load()


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
        return _load(run_dir(info))
    except SaelabError as e:
        common.fail(
            f"Cannot load {info.sae_id}'s model and SAE from its run directory {info.run_dir}: {e}. "
            "The browsing pages work without them; to run prompts, put the run directory back at that path "
            "(or analyse it again from where it is now)."
        )


@st.cache_data(max_entries=64, show_spinner=False)
def _prompt(run_dir: str, text: str) -> PromptActivations:
    loaded = _load(run_dir)
    return run_prompt(loaded.sae, loaded.sources, text)


def prompt(info: SAEInfo, text: str) -> PromptActivations:
    """The SAE's features at each token of `text` (cached per run and text), or a message on bad input."""
    load_run(info)
    with common.errors():
        return _prompt(run_dir(info), text)


def interventions(info: SAEInfo, kind: str, units: str, chosen: list[tuple[int, float]], max_acts: Any) -> list[Any]:
    """The steering interventions for `chosen` (feature, strength) pairs: one Add, Clamp or Ablate."""
    run = load_run(info)
    if run.sae.cfg.n_sources > 1:
        common.fail("Steering a crosscoder is not supported yet: choose an SAE.")
    features, strengths = [f for f, _ in chosen], [v for _, v in chosen]
    if kind == "add":
        return [Add(run.sae, features, strengths, units=units, max_acts=max_acts)]
    if kind == "clamp":
        if units == "max":
            strengths = [v * (max_acts[f] if math.isfinite(max_acts[f]) else 0.0) for f, v in chosen]
        return [Clamp(run.sae, features, strengths)]
    return [Ablate(run.sae, features)]


def side_by_side(
    info: SAEInfo, prompts: list[str], ivs: list[Any], max_new: int, temperature: float, seed: int
) -> list[dict[str, str]]:
    """Each prompt's continuation without and with the interventions (`saelab.steering.side_by_side`)."""
    return steering.side_by_side(load_run(info).sources[0][0], prompts, ivs, max_new, temperature, seed)


def cost(info: SAEInfo, ivs: list[Any], n_tokens: int) -> SteeringEffect:
    """CE increase and KL of the interventions on `n_tokens` of the run's held-out text."""
    run = load_run(info)
    model = run.sources[0][0]
    sequences = token_sequences(model, run.data, "eval", n_tokens)
    return steering.steering_effects(model, sequences, {"steered": ivs})["steered"]
