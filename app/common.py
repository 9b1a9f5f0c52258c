"""What every page shares: the pages themselves, the store, the chosen SAE, URL parameters, messages.

The page and its state live in the URL (`st.query_params`), so a link reopens the same view; the
chosen SAE is also kept in the session, so moving between pages through the sidebar keeps it.
Bad input (a missing store, an unknown SAE, a feature id out of range) stops the page with one
message instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlencode

import streamlit as st

from saelab.app import DEFAULT_STORE, STORE_ENV
from saelab.errors import SaelabError
from saelab.store import FeatureStore, SAEInfo

VIEWS = Path(__file__).with_name("views")

PAGES = {
    "overview": st.Page(VIEWS / "overview.py", title="Overview", icon=":material/dashboard:", default=True),
    "features": st.Page(VIEWS / "features.py", title="Features", icon=":material/list:", url_path="features"),
    "feature": st.Page(VIEWS / "feature.py", title="Feature", icon=":material/insights:", url_path="feature"),
    "inspect": st.Page(VIEWS / "inspect.py", title="Prompt inspector", icon=":material/search:", url_path="inspect"),
    "steer": st.Page(VIEWS / "steer.py", title="Steering", icon=":material/tune:", url_path="steer"),
    "diffing": st.Page(
        VIEWS / "diffing.py", title="Model diffing", icon=":material/compare_arrows:", url_path="diffing"
    ),
}


def store_path() -> Path:
    """The feature store this app serves (`$SAELAB_STORE`, else runs/features.duckdb)."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


def fail(message: str) -> NoReturn:
    """Show `message` as the page's error and end the script run."""
    st.error(message, icon=":material/error:")
    st.stop()


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn saelab's own errors (bad input, broken or replaced files) into a message on the page."""
    try:
        yield
    except SaelabError as e:
        fail(str(e))


def open_store() -> FeatureStore:
    """This session's read-only connection to the store (it reconnects when `saelab analyze` publishes a
    new file). One per session: DuckDB connections must not be shared between script threads."""
    path = store_path()
    held = st.session_state.get("_store")
    if held is not None and held.path == path:
        return held
    with errors():
        fs = FeatureStore(path)
    st.session_state["_store"] = fs
    return fs


def choose_sae(fs: FeatureStore) -> SAEInfo:
    """The SAE the page shows: `?sae=` in the URL, else the one chosen on another page, else the first.

    A sidebar box changes it; the choice is written back to the URL.
    """
    with errors():
        ids = fs.sae_ids()
    if not ids:
        fail(f"The feature store {fs.path} holds no SAEs yet: add one with `saelab analyze RUN_DIR --store {fs.path}`.")
    wanted = st.query_params.get("sae") or st.session_state.get("sae") or ids[0]
    if wanted not in ids:
        fail(f"No SAE {wanted!r} in {fs.path}. Stored SAEs: {', '.join(ids)}.")
    chosen = st.sidebar.selectbox("SAE", ids, index=ids.index(wanted), key=f"sae_box_{wanted}")
    st.session_state["sae"] = chosen
    st.query_params["sae"] = chosen
    with errors():
        return fs.sae(chosen)


def start() -> tuple[FeatureStore, SAEInfo]:
    """What every page opens with: this session's store and the SAE it shows."""
    fs = open_store()
    return fs, choose_sae(fs)


def int_param(name: str, default: int | None = None, low: int = 0, high: int | None = None) -> int:
    """An integer URL parameter in [low, high), or a message saying what is wrong with it."""
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        if default is None:
            fail(f"Give a `{name}` in the URL, e.g. `?{name}={low}`.")
        return default
    try:
        value = int(raw)
    except ValueError:
        fail(f"`{name}={raw}` in the URL is not a whole number.")
    if value < low or (high is not None and value >= high):
        fail(f"`{name}={value}` is out of range: it must be between {low} and {high - 1 if high else 'more'}.")
    return value


def feature_link(sae_id: str, feature: int, label: str | None = None) -> None:
    """A link that opens feature `feature`'s dashboard."""
    st.page_link(
        PAGES["feature"],
        label=label or f"#{feature}",
        query_params={"sae": sae_id, "id": str(feature)},
        icon=":material/insights:",
    )


def feature_url(sae_id: str, feature: int) -> str:
    """The dashboard's relative URL (for link columns of tables)."""
    return "./feature?" + urlencode({"sae": sae_id, "id": feature})
