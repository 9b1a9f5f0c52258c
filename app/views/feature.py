"""Feature dashboard: summary, activation histogram and bands, logit effects, examples, neighbours."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import streamlit as st

from saelab.app import common, render

CONTEXTS = {"short": (8, 2), "medium": (16, 4), "full": (None, None)}

fs, info = common.start()
sae_id = info.sae_id
feature = common.int_param("id", default=0, high=info.d_sae)
with common.errors():
    dash = fs.dashboard(sae_id, feature)
s = dash.summary


def go_to(target: int) -> None:
    """Reopen this page on feature `target` (a URL that can be shared)."""
    st.query_params["id"] = str(target)


st.title(f"{sae_id} · feature #{feature}")
if s.label:
    st.subheader(s.label)
st.caption(f"{info.model} · {info.hook_label} · {info.kind} · {info.n_tokens:,} tokens analysed")


@st.fragment
def label_editor() -> None:
    """Type a label and save it: it is searched in the feature list and kept across restarts and analyses."""
    with st.form(f"label_{feature}", border=False):
        a, b = st.columns([4, 1], vertical_alignment="bottom")
        text = a.text_input("Label", s.label or "", max_chars=200, placeholder="what this feature stands for")
        if b.form_submit_button("Save label", icon=":material/label:"):
            with common.errors():
                fs.set_label(sae_id, feature, text.strip() or None)
            st.rerun()


label_editor()
st.page_link(
    common.PAGES["steer"],
    label="Steer with this feature",
    query_params={"sae": sae_id, "f": f"{feature}:1", "units": "max"},
    icon=":material/tune:",
)

nav = st.columns([1.2, 1, 1.3, 3, 3], vertical_alignment="bottom")
nav[0].button("Previous", on_click=go_to, args=(feature - 1,), disabled=feature == 0, icon=":material/arrow_back:")
nav[1].button(
    "Next", on_click=go_to, args=(feature + 1,), disabled=feature + 1 >= info.d_sae, icon=":material/arrow_forward:"
)
if nav[2].button("Random", icon=":material/shuffle:"):
    with common.errors():
        alive = fs.fired_features(sae_id)
    go_to(random.choice(alive) if alive else random.randrange(info.d_sae))
    st.rerun()
with nav[3].form("jump", border=False):
    a, b = st.columns([2, 1], vertical_alignment="bottom")
    jump = a.number_input(f"Feature id (0 to {info.d_sae - 1})", 0, info.d_sae - 1, feature)
    if b.form_submit_button("Open"):
        go_to(int(jump))
        st.rerun()

if s.n_fires == 0:
    st.warning(
        f"Feature #{feature} is dead: it never fired on the {info.n_tokens:,} analysed tokens, so it has no "
        "activations, histogram or examples. Its decoder's logit effects and neighbours are below."
    )
else:
    cols = st.columns(4) + st.columns(4)
    cols[0].metric("density", f"{s.density:.3g}", help=f"fires on {s.n_fires:,} of {info.n_tokens:,} tokens")
    cols[1].metric("fires", f"{s.n_fires:,}")
    cols[2].metric("max activation", f"{s.max_act:.4g}")
    cols[3].metric("mean activation", f"{s.mean_act:.4g}")
    cols[4].metric("median |act|", f"{s.q50:.4g}")
    cols[5].metric("q90 |act|", f"{s.q90:.4g}")
    cols[6].metric("q99 |act|", f"{s.q99:.4g}")
    cols[7].metric("negative share", f"{s.neg_frac:.0%}")

if dash.source_norms is not None:
    st.subheader("Crosscoder")
    cols = st.columns(4)
    cols[0].metric("decoder norms", " / ".join(f"{n:.3g}" for n in dash.source_norms))
    if dash.rel_norm is not None:
        cols[1].metric("relative norm", f"{dash.rel_norm:.3f}", dash.diff_class, delta_color="off")
        cols[2].metric("decoder cosine", f"{dash.dec_cos:+.3f}")
        nu = "n/a" if dash.nu_error is None else f"{dash.nu_error:.2f} / {dash.nu_recon:.2f}"
        cols[3].metric("Latent Scaling nu_error / nu_recon", nu, help="both near 0: truly specific to its source")

left, right = st.columns([3, 2])
with left:
    st.subheader("Test a prompt")
    typed = st.text_input("Text to run this feature on", key="try", bind="query-params", placeholder="Type text")
    mark = None
    if typed:
        from saelab.app import live  # only now: browsing this page never waits on the model

        on_prompt = live.prompt(info, typed)
        values = on_prompt.feature(feature)
        peak = int(np.abs(values).argmax())
        mark = float(values[peak])
        words = fs.token_texts(info.model, on_prompt.token_ids)
        scale = max(s.max_act or 0, abs(mark), 1e-12)
        skipped = [not k for k in on_prompt.kept]
        st.html(render.prompt_html(words, on_prompt.token_ids, values.tolist(), scale, peak if mark else None, skipped))
        if mark:
            share = f" ({mark / s.max_act:.0%} of its max in the analysis)" if s.max_act else ""
            st.caption(f"Feature #{feature} on this prompt: max {mark:.4g}{share}")
        else:
            st.caption(f"Feature #{feature} does not fire on this prompt.")
            mark = None
    if s.n_fires:
        st.subheader("Activations")
        st.plotly_chart(render.activation_histogram(dash, mark), key="hist")
with right:
    st.subheader("Logit effects")
    promoted, suppressed = st.columns(2)
    for col, name, effects in ((promoted, "promotes", dash.promoted), (suppressed, "suppresses", dash.suppressed)):
        table = pd.DataFrame([(repr(t), v) for t, v in effects], columns=[name, "logit"])
        col.dataframe(
            table, hide_index=True, key=name, column_config={"logit": st.column_config.NumberColumn(format="%+.3f")}
        )
    st.subheader("Nearest features (decoder cosine)")
    grid = st.columns(2)
    for j, (other, cos) in enumerate(dash.neighbours):
        with grid[j % 2]:
            common.feature_link(sae_id, other, label=f"#{other}  cos {cos:.3f}")

if s.n_fires:
    context = st.segmented_control(
        "Context", list(CONTEXTS), default="medium", key="ctx", bind="query-params", required=True
    )
    before, after = CONTEXTS[context]
    scale = max(s.max_act, 1e-12)
    top_tab, band_tab = st.tabs(["Top activations", "Samples by activation band"])
    with top_tab:
        st.html(render.examples_html(dash.top_examples, scale, before, after))
    with band_tab:
        for band in sorted(dash.band_examples, reverse=True):
            st.markdown(f"**{render.band_heading(band, dash.band_edges, dash.band_counts)}**")
            st.html(render.examples_html(dash.band_examples[band], scale, before, after))
