"""Prompt inspector: type text, see which features fire at each token, rank them, highlight one."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from saelab.app import common, live, render

RANKINGS = {
    "activation": "raw activation",
    "relative": "activation / the feature's max activation in the analysis",
    "density-penalised": "relative activation x log10(1 / density): rare features first, generic ones last",
}

fs, info = common.start()
sae_id = info.sae_id
st.title(f"Prompt inspector · {sae_id}")
st.caption(f"{info.model} · {info.hook_name} · type text to see which of the {info.d_sae:,} features fire")

text = st.text_area("Prompt", key="text", bind="query-params", placeholder="To be, or not to be, that is the question")
if not text:
    st.info("Type a prompt (Ctrl+Enter runs it).")
    st.stop()
acts = live.prompt(info, text)
with common.errors():
    tokens = fs.token_texts(info.model, acts.token_ids)
skipped = [not k for k in acts.kept]
n = len(tokens)

left, right = st.columns([2, 1])
position = left.number_input(
    f"Token (0 to {n - 1})", 0, n - 1, int(np.argmax(np.abs(acts.values).max(axis=1))), key="tok", bind="query-params"
)
rank = right.segmented_control(
    "Rank by", list(RANKINGS), default="activation", key="rank", bind="query-params", required=True,
    help="; ".join(f"{k}: {v}" for k, v in RANKINGS.items()),
)  # fmt: skip

active = acts.active(position)
highlight = st.query_params.get("hl")
shown = int(highlight) if highlight and highlight.isdigit() and int(highlight) < info.d_sae else None
if shown is None and active:
    shown = active[0][0]
# Only the features on show are read from the store: the page reruns on every change.
with common.errors():
    summary = {s.feature: s for s in fs.summaries(sae_id, sorted({f for f, _ in active} | {shown} - {None}))}
values = acts.feature(shown) if shown is not None else np.zeros(n)
shown_max = summary[shown].max_act if shown in summary else None
scale = shown_max or float(np.abs(values).max() or 1)
st.html(render.prompt_html(tokens, acts.token_ids, values.tolist(), scale, peak=position, skipped=skipped))
st.caption(
    f"{n} tokens; colour: feature #{shown}'s activation (scaled to its max {scale:.3g}); outlined: token {position}"
    + (f"; {sum(skipped)} token(s) struck through are skipped by the SAE (massive norm)" if any(skipped) else "")
)
sources = info.params.get("sources") or []
parts = acts.feature_parts(shown) if shown is not None else None
if parts is not None:
    st.markdown(f"**Latent #{shown} through each source**")
    st.caption(
        "Each source's part of the latent's encoder input on the same text (with the encoder bias they sum to its "
        "pre-activation): which model drives the latent, token by token."
    )
    part_scale = float(np.abs(parts).max() or 1.0)
    for j, col in enumerate(st.columns(parts.shape[1])):
        col.caption(sources[j] if j < len(sources) else f"source {j}")
        with col:
            st.html(render.prompt_html(tokens, acts.token_ids, parts[:, j].tolist(), part_scale, peak=position))

st.subheader(f"Features at token {position}: {tokens[position]!r} (id {acts.token_ids[position]})")
if skipped[position]:
    st.warning("The SAE skips this token: its activation norm is far above the rest (an attention sink).")
elif not active:
    st.info("No feature fires at this token.")
else:
    rows = []
    for f, v in active:
        top, d = summary[f].max_act, summary[f].density or 0.0
        rel = v / top if top else float("nan")
        rows.append({"feature": f, "label": summary[f].label, "activation": v, "relative": rel, "density": d,
                     "density-penalised": rel * (math.log10(1 / d) if d > 0 else 0.0)})  # fmt: skip
        if acts.source_parts is not None:  # a crosscoder: what each source puts into the latent here
            here = acts.feature_parts(f)[position]
            rows[-1] |= {f"from {name}": float(x) for name, x in zip(sources or range(len(here)), here, strict=False)}
    table = pd.DataFrame(rows).sort_values(rank, ascending=False, key=lambda c: c.abs() if rank == "activation" else c)
    table.insert(0, "open", [common.feature_url(sae_id, f) for f in table["feature"]])
    st.dataframe(
        table,
        hide_index=True,
        key="features_at_token",
        column_config={
            "open": st.column_config.LinkColumn("open", display_text="open", width="small"),
            "density": st.column_config.NumberColumn(format="%.2e"),
        },
    )
    options = [int(f) for f in table["feature"]]
    key = f"hl_box_{position}"

    def highlight_choice() -> None:
        st.query_params["hl"] = str(st.session_state[key])

    st.selectbox(
        "Highlight a feature across the prompt",
        options,
        index=options.index(shown) if shown in options else 0,
        key=key,
        on_change=highlight_choice,
    )
