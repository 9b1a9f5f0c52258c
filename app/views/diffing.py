"""Model diffing with a two-source crosscoder: classes, relative norms, cosines, Latent Scaling, leaders."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from saelab.app import common, render
from saelab.config import mixture_parts

CLASSES = ("A-only", "shared", "B-only")

fs, info = common.start()
sae_id = info.sae_id
with common.errors():
    counts = fs.diffing_counts(sae_id)  # latents per class: none unless a two-source crosscoder
if not counts:
    crosscoders = [s for s in fs.sae_ids() if fs.diffing_counts(s)]
    common.fail(
        f"{sae_id!r} is not a two-source crosscoder, so it has no model diffing. "
        + (f"Crosscoders in this store: {', '.join(crosscoders)}." if crosscoders else "This store has no crosscoder.")
    )

with common.errors():
    df = fs.diffing(sae_id)
sources = (info.params or {}).get("sources") or ["source A", "source B"]
st.title(f"Model diffing: {sae_id}")
st.caption(f"A = `{sources[0]}` · B = `{sources[1]}` · {info.d_sae:,} latents · {info.n_tokens:,} tokens analysed")

nu_below = st.slider(
    "Latent Scaling cut (nu_error and nu_recon below it)", 0.05, 1.0, 0.3, 0.05, key="nu", bind="query-params"
)
with common.errors():
    confirmed = fs.diffing_counts(sae_id, nu_below=nu_below)
cols = st.columns(3)
for col, cls in zip(cols, CLASSES, strict=True):
    col.metric(
        cls,
        f"{counts.get(cls, 0):,}",
        f"{confirmed.get(cls, 0):,} with nu < {nu_below:g}",
        delta_color="off",
        delta_arrow="off",
    )

left, right = st.columns(2)
left.plotly_chart(
    render.histogram(df["rel_norm"], "relative decoder norm ||d_B|| / (||d_A|| + ||d_B||)", (0.1, 0.9)), key="rel"
)
right.plotly_chart(render.histogram(df["dec_cos"], "cosine between the two decoder directions"), key="cos")

st.subheader("Latent Scaling")
scaled = df.dropna(subset=["nu_error", "nu_recon"])
if scaled.empty:
    st.info("This store has no Latent Scaling ratios for it (analysed before schema v4): run `saelab analyze` again.")
else:
    fig, hidden = render.scaling_scatter(scaled)
    st.caption(
        "Select points (click, box or lasso) to list their dashboards."
        + (f" {hidden} latents with extreme ratios lie outside the view (zoom out to see them)." if hidden else "")
    )
    event = st.plotly_chart(fig, key="scaling", on_select="rerun", selection_mode=("points", "box", "lasso"))
    picked = render.selected_features(event)
    if picked:
        st.write(f"{len(picked)} selected:")
        grid = st.columns(6)
        for j, f in enumerate(picked[:60]):
            with grid[j % 6]:
                common.feature_link(sae_id, f)

parts = mixture_parts((info.params or {}).get("dataset") or "")
with common.errors():
    leaning = fs.leaning(sae_id, top=st.number_input("Latents per source", 1, 50, 5, key="top", bind="query-params"))
    origins = fs.example_origins(sae_id, len(parts)) if len(parts) > 1 else None
for name, source in (("B", sources[1]), ("A", sources[0])):
    st.subheader(f"Leaning most to {name}: `{source}`")
    for r in leaning[name].itertuples():
        share = ""
        if origins is not None:
            n = origins.reindex(index=[r.feature], columns=range(len(parts)), fill_value=0).iloc[0]
            total = max(int(n.sum()), 1)
            share = " · top examples from " + ", ".join(
                f"{Path(p).name or p} {100 * c / total:.0f}%" for p, c in zip(parts, n, strict=True)
            )
        common.feature_link(
            sae_id,
            r.feature,
            label=f"#{r.feature} {r.diff_class} · rel norm {r.rel_norm:.3f} · cos {r.dec_cos:+.2f}"
            f" · nu_error {r.nu_error:.2f} · nu_recon {r.nu_recon:.2f}{share}",
        )
