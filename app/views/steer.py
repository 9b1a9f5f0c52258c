"""Steering: continuations without and with features added / clamped / ablated, and what it costs."""

from __future__ import annotations

import streamlit as st

from saelab.app import common, live
from saelab.steering import parse_features

KINDS = {
    "add": "add strength x the decoder direction",
    "clamp": "clamp the activation to strength",
    "ablate": "zero it",
}

fs, info = common.start()
sae_id = info.sae_id
st.title(f"Steering · {sae_id}")
st.caption("Continuations of the same prompts under the same seed, without and with the intervention.")

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

if not spec:
    st.info("Name the features to steer with, e.g. `12:2.5` (a dashboard's 'Steer with this feature' fills it in).")
    st.stop()
with common.errors():
    chosen = parse_features(spec, info.d_sae)
prompts = [p for p in (prompts_text or "").splitlines() if p.strip()]
if not prompts:
    common.fail("Give at least one prompt.")
with common.errors():
    interventions = live.interventions(info, kind, units, chosen, fs.max_acts(sae_id))


@st.fragment
def continuations() -> None:
    """Generation runs in a fragment: the rest of the page stays responsive while it runs."""
    if not st.button("Generate", type="primary", icon=":material/play_arrow:"):
        return
    with st.spinner("Generating ..."), common.errors():
        rows = live.side_by_side(info, prompts, interventions, max_new, temperature, seed)
    for row in rows:
        st.markdown(f"**{row['prompt']}**")
        left, right = st.columns(2)
        left.caption("unsteered")
        left.text(row["clean"])
        right.caption("steered")
        right.text(row["steered"])


@st.fragment
def costs() -> None:
    """CE increase and KL on held-out text, the price of the intervention."""
    n_tokens = st.number_input("Held-out tokens to measure the cost on", 128, 65_536, 2048, 128, key="cost_tokens")
    if not st.button("Measure the cost", icon=":material/monitoring:"):
        return
    with st.spinner("Running the model on held-out text ..."), common.errors():
        effect = live.cost(info, interventions, int(n_tokens))
    cols = st.columns(3)
    cols[0].metric("CE increase (nats)", f"{effect.ce_increase:+.4f}")
    cols[1].metric("KL(clean || steered)", f"{effect.kl:.4f}")
    cols[2].metric("CE clean / steered", f"{effect.ce_clean:.3f} / {effect.ce_loss:.3f}")


continuations()
st.subheader("Cost")
costs()
