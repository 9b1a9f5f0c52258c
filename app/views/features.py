"""Features: a sortable, filterable, searchable list; each row opens its dashboard; CSV / Parquet export."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable

import pandas as pd
import streamlit as st

from saelab.app import common
from saelab.config import SIGNED_SPARSIFIERS
from saelab.store import SORT_KEYS, FeatureSummary

PAGE_SIZE = 50
SEARCH_LIMIT = 200
MODES = {"text": "label, example or promoted token", "token": "fires on this exact token", "id": "feature id"}

fs, info = common.start()
sae_id = info.sae_id
signed = info.sparsifier in SIGNED_SPARSIFIERS
with common.errors():
    is_crosscoder = bool(fs.diffing_counts(sae_id))

st.title(f"Features of {sae_id}")
st.caption(f"{info.d_sae:,} features, {info.d_sae - info.n_dead:,} fired on {info.n_tokens:,} analysed tokens")

raw_sort = st.query_params.get("sort")
if raw_sort is not None and raw_sort not in SORT_KEYS:
    st.warning(f"Cannot sort by `{raw_sort}`; choose one of {', '.join(SORT_KEYS)}. Showing the default order.")
    del st.query_params["sort"]

top = st.columns([3, 2, 1.2, 1.2])
query = top[0].text_input("Search", key="q", bind="query-params", placeholder="' king', a label, or 123")
mode = top[1].segmented_control(
    "Search by",
    list(MODES),
    default="text",
    key="by",
    bind="query-params",
    required=True,
    help="; ".join(f"{k}: {v}" for k, v in MODES.items()),
)
sort = top[2].selectbox("Sort by", SORT_KEYS, index=SORT_KEYS.index("density"), key="sort", bind="query-params")
order = top[3].segmented_control(
    "Order", ["desc", "asc"], default="desc", key="order", bind="query-params", required=True
)

with st.sidebar:
    st.subheader("Filters")
    lo, hi = st.slider("log10 firing density", -8.0, 0.0, (-8.0, 0.0), step=0.25, key="density", bind="query-params")
    status = st.segmented_control(
        "Features", ["all", "alive", "dead"], default="all", key="status", bind="query-params", required=True
    )
    cls = (
        st.selectbox("Diffing class", ["any", "A-only", "shared", "B-only"], key="cls", bind="query-params")
        if is_crosscoder
        else "any"
    )
    neg = (
        st.slider("min share of negative firings", 0.0, 1.0, 0.0, 0.05, key="neg", bind="query-params")
        if signed
        else 0.0
    )


def frame(rows: list[FeatureSummary], extra: dict[int, object] | None = None) -> pd.DataFrame:
    """Rows as a table with top promoted tokens and a link to each dashboard."""
    with common.errors():
        promoted = fs.promoted_tokens(sae_id, [r.feature for r in rows])
    df = pd.DataFrame(
        [dataclasses.asdict(r) for r in rows], columns=[f.name for f in dataclasses.fields(FeatureSummary)]
    )
    df["promotes"] = [" ".join(repr(t) for t in promoted.get(f, [])) for f in df["feature"]]
    if extra is not None:
        df.insert(1, "examples on token", [extra.get(f) for f in df["feature"]])
    df.insert(0, "open", [common.feature_url(sae_id, f) for f in df["feature"]])
    return df


def show(df: pd.DataFrame, name: str, everything: Callable[[], pd.DataFrame] | None = None) -> None:
    """The table (selecting a row opens its dashboard) and downloads of `everything` it was cut from
    (all matching features, built only when a download is clicked), else of the table itself."""
    event = st.dataframe(
        df,
        hide_index=True,
        height=min(35 * (len(df) + 1) + 3, 1200),
        key=f"table_{name}",
        on_select="rerun",
        selection_mode="single-row",
        column_config={
            "open": st.column_config.LinkColumn("open", display_text="open", width="small"),
            "density": st.column_config.NumberColumn(format="%.2e"),
        },
    )
    picked = event.selection.rows if event is not None and hasattr(event, "selection") else []
    if picked:
        st.switch_page(common.PAGES["feature"], query_params={"sae": sae_id, "id": str(df["feature"].iloc[picked[0]])})

    def table() -> pd.DataFrame:
        return (everything() if everything else df).drop(columns=["open"])

    def parquet() -> bytes:
        buf = io.BytesIO()
        table().to_parquet(buf, index=False)
        return buf.getvalue()

    a, b, _ = st.columns([2, 2, 5])
    what = "all matching" if everything else "these"
    a.download_button(
        f"CSV ({what})",
        lambda: table().to_csv(index=False),
        f"{sae_id}-{name}.csv",
        "text/csv",
        icon=":material/download:",
    )
    b.download_button(f"Parquet ({what})", parquet, f"{sae_id}-{name}.parquet", icon=":material/download:")


with common.errors():
    if query and mode == "id":
        text = query.strip().lstrip("#")
        if not text.isdigit() or int(text) >= info.d_sae:
            common.fail(f"`{query}` is not a feature id of {sae_id}: ids run from 0 to {info.d_sae - 1}.")
        common.feature_link(sae_id, int(text), label=f"Open feature #{int(text)}")
        show(frame(fs.summaries(sae_id, [int(text)])), f"feature-{int(text)}")
    elif query and mode == "token":
        hits = fs.features_for_token(sae_id, query, limit=SEARCH_LIMIT)
        st.write(f"{len(hits)} features have top examples on the token {query!r}.")
        show(frame(fs.summaries(sae_id, [h[0] for h in hits]), {h[0]: h[1] for h in hits}), "token-search")
    elif query:
        found = fs.search(sae_id, query, limit=SEARCH_LIMIT)
        st.write(
            f"{len(found)} features match {query!r}"
            + (f" (the first {SEARCH_LIMIT})" if len(found) == SEARCH_LIMIT else "")
        )
        show(frame(found), "search")
    else:
        filters = {
            "min_density": None if lo <= -8.0 else 10**lo,
            "max_density": None if hi >= 0.0 else 10**hi,
            "fired": {"all": None, "alive": True, "dead": False}[status],
            "diff_class": None if cls == "any" else cls,
            "min_neg_frac": neg or None,
        }
        total = fs.feature_list(sae_id, sort, order == "desc", limit=0, **filters).total
        pages = max(1, math.ceil(total / PAGE_SIZE))
        page = st.columns([1, 4])[0].number_input(f"Page (of {pages})", 1, pages, 1, key="page", bind="query-params")
        listing = fs.feature_list(
            sae_id, sort, order == "desc", offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, **filters
        )
        st.write(f"{total:,} features match; showing {len(listing.rows)} sorted by {sort} ({order}).")
        show(
            frame(listing.rows),
            "features",
            lambda: frame(fs.feature_list(sae_id, sort, order == "desc", limit=None, **filters).rows),
        )
