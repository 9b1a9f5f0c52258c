"""Steering: continuations without and with features added / clamped / ablated, what it costs and what
it does, a strength sweep against the difference-in-means baseline, and saved experiments."""

from __future__ import annotations

import math

import streamlit as st

from saelab.app import common, live, render
from saelab.steering import parse_features

KINDS = {
    "add": "add strength x the decoder direction",
    "clamp": "clamp the activation to strength",
    "ablate": "zero it",
}
# The page's settings, all in the URL: a saved experiment keeps them, and reopens them as a link.
URL_KEYS = ("f", "kind", "units", "src", "prompt", "n", "temp", "seed", "sweep", "targets", "tokens", "pos", "neg")

fs, info = common.start()
sae_id = info.sae_id
st.title(f"Steering · {sae_id}")
st.caption("Continuations of the same prompts under the same seed, without and with the intervention.")

sources = info.params.get("sources") or [f"{info.model}@{info.hook_name}"]
source = 0
if len(sources) > 1:
    source = st.segmented_control(
        "Steer the model of source", range(len(sources)), format_func=sources.__getitem__, default=0, key="src",
        bind="query-params", required=True,
        help="A crosscoder latent has a decoder direction in each source: adding it steers that source's model.",
    )  # fmt: skip

spec = st.text_input(
    "Features (ID:STRENGTH, comma-separated)", key="f", bind="query-params", placeholder="12:2.5, 40:-1"
)
a, b, c = st.columns(3)
kind = a.segmented_control(
    "Kind", list(KINDS), default="add", key="kind", bind="query-params", required=True,
    help="; ".join(f"{k}: {v}" for k, v in KINDS.items()),
)  # fmt: skip
units = b.segmented_control(
    "Strength units", ["max", "raw"], default="max", key="units", bind="query-params", required=True,
    help="max: multiples of the feature's largest activation in the analysis; raw: activation units",
)  # fmt: skip
prompts_text = c.text_area("Prompts (one per line)", "The king said", key="prompt", bind="query-params")
d, e, g = st.columns(3)
max_new = int(d.number_input("New tokens", 1, 256, 30, key="n", bind="query-params"))
temperature = float(e.number_input("Temperature", 0.0, 2.0, 0.0, 0.1, key="temp", bind="query-params"))
seed = int(g.number_input("Seed", 0, 2**31 - 1, 0, key="seed", bind="query-params"))


@st.fragment
def saved_experiments() -> None:
    """The experiments saved for this SAE: each one's sweep, its settings as a link, and a delete button."""
    with common.errors():
        names = fs.steering_experiments(sae_id)
    if not names:
        st.caption("None yet: run a sweep below and save it.")
        return
    name = st.selectbox("Experiment", names, key="experiment")
    with common.errors():
        df = fs.steering(sae_id, name)
        settings = fs.steering_settings(sae_id, name)
    if "kl" in df and df["kl"].notna().any() and "delta_logprob" in df and df["delta_logprob"].notna().any():
        st.plotly_chart(render.steering_frontier(df), key="saved_frontier")
    st.dataframe(df, hide_index=True, key="saved_table")
    left, right = st.columns([3, 1])
    params = {k: str(v) for k, v in settings.items() if k in URL_KEYS and v not in (None, "")}
    if params:
        left.page_link(
            common.PAGES["steer"],
            label="Open its settings",
            query_params={"sae": sae_id, **params},
            icon=":material/tune:",
        )
    if right.button("Delete", key="delete_experiment", icon=":material/delete:"):
        with common.errors():
            fs.delete_steering(sae_id, name)
        st.rerun()


with st.expander("Saved experiments"):
    saved_experiments()

if not spec:
    st.info("Name the features to steer with, e.g. `12:2.5` (a dashboard's 'Steer with this feature' fills it in).")
    st.stop()
with common.errors():
    chosen = parse_features(spec, info.d_sae)
prompts = [p for p in (prompts_text or "").splitlines() if p.strip()]
if not prompts:
    common.fail("Give at least one prompt.")
with common.errors():
    max_acts = fs.max_acts(sae_id)
interventions = live.interventions(info, kind, units, chosen, max_acts, source)


@st.fragment
def continuations() -> None:
    """Generation runs in a fragment: the rest of the page stays responsive while it runs."""
    if not st.button("Generate", type="primary", icon=":material/play_arrow:"):
        return
    with st.spinner("Generating ..."), common.errors():
        rows = live.side_by_side(info, prompts, interventions, max_new, temperature, seed, source)
    for row in rows:
        st.markdown(f"**{row['prompt']}**")
        left, right = st.columns(2)
        left.caption("unsteered")
        left.text(row["clean"])
        right.caption("steered")
        right.text(row["steered"])


def _strengths(text: str) -> list[float]:
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(part)
        except ValueError:
            common.fail(f"Sweep strengths: {part!r} is not a number (write them comma-separated, e.g. 0.5, 1, 2).")
        if not math.isfinite(value):
            common.fail(f"Sweep strengths must be finite, got {part!r}.")
        values.append(value)
    if not values:
        common.fail("Give at least one sweep strength, e.g. 0.5, 1, 2.")
    return values


@st.fragment
def effects() -> None:
    """What the intervention costs (CE, KL on held-out text) and does (the targets' log-probability),
    swept over strengths beside the difference-in-means baseline; the result can be saved."""
    targets_text = st.text_input(
        "Target tokens ('|'-separated, e.g. ` king| queen`; empty: each feature's most promoted tokens)",
        key="targets", bind="query-params",
    )  # fmt: skip
    left, right = st.columns(2)
    sweep_text = left.text_input(
        "Sweep strengths" + (" (ablation: each feature is zeroed alone)" if kind == "ablate" else ""),
        "0, 0.5, 1, 2, 4", key="sweep", bind="query-params", disabled=kind == "ablate",
    )  # fmt: skip
    n_tokens = int(right.number_input("Held-out tokens", 128, 65_536, 2048, 128, key="tokens", bind="query-params"))
    with st.expander("Baseline: difference in means (optional)"):
        st.caption(
            "The mean activation over the first prompts minus that over the second, at each prompt's last token, "
            "added at the same size as each feature's direction (a supervised baseline for SAE steering)."
        )
        pos_col, neg_col = st.columns(2)
        positive = pos_col.text_area("Prompts with the concept (one per line)", key="pos", bind="query-params")
        negative = neg_col.text_area("Prompts without it (one per line)", key="neg", bind="query-params")
    lines = {
        name: [p for p in (text or "").splitlines() if p.strip()]
        for name, text in (("pos", positive), ("neg", negative))
    }
    if bool(lines["pos"]) != bool(lines["neg"]):
        st.warning("The baseline needs both sets of prompts.")
    settings = {k: st.query_params.get(k) for k in URL_KEYS} | {"src": str(source)}
    if st.button("Measure", icon=":material/monitoring:"):
        with st.spinner("Running the model on held-out text ..."), common.errors():
            targets = live.targets(info, targets_text or "", source)
            baseline = (lines["pos"], lines["neg"]) if lines["pos"] and lines["neg"] else None
            strengths = [0.0] if kind == "ablate" else _strengths(sweep_text or "")
            df = live.sweep(info, [f for f, _ in chosen], strengths, kind, units, max_acts, n_tokens, targets,
                            baseline, source)  # fmt: skip
        st.session_state["measured"] = (settings, df)
    measured = st.session_state.get("measured")
    if measured is None or measured[0] != settings:
        return
    df = measured[1]
    if df["delta_logprob"].notna().any() and len(df) > 1:
        st.plotly_chart(render.steering_frontier(df), key="frontier")
    st.dataframe(df, hide_index=True, key="measured_table")
    name_col, button_col = st.columns([3, 1])
    name = name_col.text_input("Save as", placeholder="experiment name", key="save_name")
    if button_col.button("Save", key="save_experiment", icon=":material/save:", disabled=not name):
        with common.errors():
            fs.put_steering(sae_id, name, df, settings)
        st.toast(f"Saved {name!r}: it is listed under 'Saved experiments', here and after a restart.")
        st.rerun()


continuations()
st.subheader("Effect and cost")
effects()
