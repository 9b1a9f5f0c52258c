"""Overview: every SAE in the store with its settings and evals, training curves, density histograms."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saelab.app import common, render
from saelab.store import SAEInfo

fs, info = common.start()


def row(i: SAEInfo) -> dict[str, object]:
    """One SAE as a row of the overview table."""
    ev = i.eval or {}
    dense = ev.get("dense_frac")
    # Evals first, so they stay in view; the long model and hook names last.
    return {
        "SAE": i.sae_id,
        "sparsifier": i.kind,
        "d_sae": i.d_sae,
        "k": i.k,
        "FVU": ev.get("fvu"),
        "CE recovered": ev.get("ce_loss_recovered"),
        "KL": ev.get("kl_div"),
        "L0": ev.get("l0"),
        "dead": i.n_dead,
        "dense": None if dense is None else round(dense * i.d_sae),
        "tokens analysed": i.n_tokens,
        "model": i.model,
        "hook point": i.hook_label,
    }


st.title("Feature store")
st.caption(f"{fs.path}")
with common.errors():
    infos = {sid: fs.sae(sid) for sid in fs.sae_ids()}
table = pd.DataFrame([row(i) for i in infos.values()])
st.dataframe(
    table.assign(link=[f"./features?sae={sid}" for sid in table["SAE"]]),
    hide_index=True,
    column_config={
        "link": st.column_config.LinkColumn("features", display_text="browse", width="small"),
        **{c: st.column_config.NumberColumn(format="%.4g") for c in ("FVU", "CE recovered", "KL", "L0")},
    },
)

st.header(info.sae_id)
ev = info.eval or {}
cols = st.columns(6)
cols[0].metric("features", f"{info.d_sae:,}")
cols[1].metric("dead", f"{info.n_dead:,}", help="never fired on the analysed tokens")
cols[2].metric("tokens analysed", f"{info.n_tokens:,}")
chosen_row = row(info)
for col, name in zip(cols[3:], ("FVU", "CE recovered", "L0"), strict=True):
    value = chosen_row[name]
    col.metric(name, "n/a" if value is None else f"{value:.4g}")
if not ev:
    st.info(f"{info.sae_id} was never evaluated: run `saelab eval {info.run_dir or 'RUN_DIR'}` and analyse again.")
st.page_link(common.PAGES["features"], label="Browse its features", query_params={"sae": info.sae_id})

left, right = st.columns(2)
with left:
    st.subheader("Training curves")
    with common.errors():
        curves = fs.train_metrics(info.sae_id)
    if curves:
        names = sorted(curves)
        default = [n for n in ("fvu", "loss", "l0") if n in curves] or names[:1]
        shown = st.multiselect("metrics", names, default=default, key=f"curves_{info.sae_id}")
        st.plotly_chart(render.training_curves(curves, shown), key="curves")
    else:
        st.info("No training curves stored for this SAE (its run directory had no metrics.jsonl).")
with right:
    st.subheader("Firing density")
    others = [s for s in infos if s != info.sae_id]
    compare = st.multiselect("compare with", others, key=f"compare_{info.sae_id}") if others else []
    chosen = [info.sae_id, *compare]
    st.plotly_chart(
        render.density_histogram({s: (infos[s].density_edges or [], infos[s].density_counts or []) for s in chosen}),
        key="density",
    )
    if compare:
        side = table.set_index("SAE").loc[chosen].T
        st.dataframe(side.map(lambda v: "" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v)))
