"""What the pages that run the model share: the run's model and SAE, loaded once per server process.

Only live pages import this module (it imports torch); the browsing pages never wait on a model.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from saelab.app import common
from saelab.errors import SaelabError
from saelab.prompt import PromptActivations, run_prompt
from saelab.rundir import LoadedRun, RunDir
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
