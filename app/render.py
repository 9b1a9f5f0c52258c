"""HTML and figures for the pages, as plain functions of store records (tests call them directly).

Token text is shown as the model sees it: every token is escaped (no HTML from a corpus reaches
the page), spaces, tabs and newlines get visible glyphs, and each token's background is scaled to
its activation (orange positive, blue negative for signed SAEs), with the example's token outlined
and a hover that gives the token's text, id and activation.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from saelab.store import BASELINE_KIND, Example, FeatureDashboard

POSITIVE = (255, 127, 14)
NEGATIVE = (31, 119, 180)
WHITESPACE = {" ": "\u00b7", "\t": "\u21e5", "\r": "\u240d", "\n": "\u21b5"}

TOKEN_CSS = """
<style>
.sl-ex { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; line-height: 1.9;
         white-space: pre-wrap; word-break: break-all; margin: 0 0 0.35rem 0; }
.sl-ex .act { color: #888; margin-right: 0.6rem; }
.sl-tok { position: relative; border-radius: 3px; padding: 1px 0; }
.sl-tok .ws { color: #aaa; }
.sl-tok.peak { outline: 2px solid #d62728; outline-offset: -1px; }
.sl-tok.skipped { text-decoration: line-through; color: #999; }
.sl-tok:hover { outline: 1px solid #333; }
.sl-tok:hover::after { content: attr(data-tip); position: absolute; left: 0; top: 1.6em; z-index: 10;
         background: #222; color: #fff; padding: 2px 6px; border-radius: 3px; white-space: pre; font-size: 0.75rem; }
</style>
"""


def visible(text: str) -> str:
    """A token's text as escaped HTML with its whitespace shown: spaces, tabs and newlines get glyphs
    (a newline does not break the line, so an example stays one line), and an empty token shows as an
    empty-set sign."""
    if text == "":
        return '<span class="ws">\u2205</span>'
    out = []
    for ch in text:
        if ch in WHITESPACE:
            out.append(f'<span class="ws">{WHITESPACE[ch]}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def background(act: float, scale: float) -> str:
    """The CSS background of a token with activation `act` when `scale` is the strongest one shown:
    orange for positive, blue for negative, opacity proportional to |act| / scale."""
    if not act or not scale or not math.isfinite(act):
        return "transparent"
    r, g, b = POSITIVE if act > 0 else NEGATIVE
    alpha = min(abs(act) / scale, 1.0)
    return f"rgba({r}, {g}, {b}, {alpha:.3f})"


def tokens_html(
    tokens: Sequence[str],
    token_ids: Sequence[int],
    acts: Sequence[float],
    scale: float,
    peak: int | None = None,
    skipped: Sequence[bool] = (),
) -> str:
    """Spans of tokens, each coloured by its activation, with a hover of its text, id and activation;
    tokens flagged in `skipped` (the SAE does not read them) are struck through and say so."""
    spans = []
    for i, (text, tid, act) in enumerate(zip(tokens, token_ids, acts, strict=True)):
        skip = i < len(skipped) and skipped[i]
        what = "skipped by the SAE (massive norm)" if skip else f"act {act:.3f}"
        tip = html.escape(f"{text!r}  id {tid}  {what}", quote=True)
        cls = "sl-tok" + (" peak" if i == peak else "") + (" skipped" if skip else "")
        spans.append(
            f'<span class="{cls}" style="background:{background(act, scale)}" title="{tip}" data-tip="{tip}"'
            f' data-act="{act:.4f}" data-id="{tid}">{visible(text)}</span>'
        )
    return "".join(spans)


def prompt_html(
    tokens: Sequence[str],
    token_ids: Sequence[int],
    acts: Sequence[float],
    scale: float,
    peak: int | None = None,
    skipped: Sequence[bool] = (),
) -> str:
    """A typed prompt as one line of tokens (see `tokens_html`) with the token styles, ready for `st.html`."""
    return TOKEN_CSS + f'<div class="sl-ex">{tokens_html(tokens, token_ids, acts, scale, peak, skipped)}</div>'


def example_html(ex: Example, scale: float, before: int | None = None, after: int | None = None) -> str:
    """One example as a line: its activation, then its window (cut to `before` / `after` tokens of
    context around the example's token when given) with the example's token outlined."""
    lo = 0 if before is None else max(0, ex.index - before)
    hi = len(ex.tokens) if after is None else min(len(ex.tokens), ex.index + after + 1)
    body = tokens_html(ex.tokens[lo:hi], ex.token_ids[lo:hi], ex.acts[lo:hi], scale, peak=ex.index - lo)
    return f'<div class="sl-ex"><span class="act">{ex.act:+.3f}</span>{body}</div>'


def examples_html(
    examples: Sequence[Example], scale: float, before: int | None = None, after: int | None = None
) -> str:
    """A block of examples with the token styles, ready for `st.html`."""
    return TOKEN_CSS + "".join(example_html(ex, scale, before, after) for ex in examples)


def band_heading(band: int, edges: Sequence[float], counts: Sequence[int]) -> str:
    """'Band 3: activation 1.20 to 1.60, 12.5% of firings' for a dashboard's band samples."""
    total = sum(counts) or 1
    return (
        f"Band {band}: activation {edges[band]:.3g} to {edges[band + 1]:.3g}, "
        f"{100 * counts[band] / total:.1f}% of firings ({counts[band]})"
    )


def activation_histogram(dash: FeatureDashboard, mark: float | None = None) -> go.Figure:
    """The feature's |activation| histogram with its sampling bands shaded and numbered, and `mark`
    (e.g. its activation on a typed prompt) as a vertical line."""
    edges, counts = dash.hist_edges, dash.hist_counts
    fig = go.Figure(
        go.Bar(
            x=[(a + b) / 2 for a, b in itertools.pairwise(edges)],
            y=counts,
            width=[b - a for a, b in itertools.pairwise(edges)],
            marker_color=f"rgb{POSITIVE}",
            hovertemplate="activation %{x:.3g}<br>%{y} firings<extra></extra>",
        )
    )
    for i, (a, b) in enumerate(itertools.pairwise(dash.band_edges)):
        fig.add_vrect(x0=a, x1=b, fillcolor="#888", opacity=0.08 if i % 2 else 0.0, line_width=0)
        fig.add_annotation(x=(a + b) / 2, y=1.04, yref="paper", text=str(i), showarrow=False, font_size=10)
    if mark is not None:
        fig.add_vline(x=abs(mark), line_color="#d62728", annotation_text=f"prompt {mark:.3g}")
    fig = _layout(fig, "activation (|act| for signed SAEs)", "firings", height=280)
    fig.update_layout(showlegend=False)
    return fig


def density_histogram(infos: Mapping[str, tuple[Sequence[float], Sequence[int]]]) -> go.Figure:
    """log10 firing-density histograms of one or more SAEs ({name: (edges, counts)}), overlaid."""
    fig = go.Figure()
    for name, (edges, counts) in infos.items():
        fig.add_trace(
            go.Bar(
                x=[(a + b) / 2 for a, b in itertools.pairwise(edges)],
                y=counts,
                name=name,
                opacity=0.6 if len(infos) > 1 else 1.0,
                hovertemplate="log10 density %{x:.2f}<br>%{y} features<extra>" + html.escape(name) + "</extra>",
            )
        )
    fig.update_layout(barmode="overlay", bargap=0.02)
    return _layout(fig, "log10 firing density", "features", height=300)


def training_curves(metrics: Mapping[str, tuple[Sequence[int], Sequence[float]]], names: Sequence[str]) -> go.Figure:
    """Training curves of the chosen metrics against the step, one panel each (log y where one spans a decade)."""
    fig = make_subplots(rows=max(len(names), 1), cols=1, shared_xaxes=True, subplot_titles=list(names))
    for row, name in enumerate(names, start=1):
        steps, values = metrics[name]
        fig.add_trace(go.Scatter(x=list(steps), y=list(values), name=name, mode="lines"), row=row, col=1)
        wide = min(values, default=0) > 0 and max(values) > 10 * min(values)  # spans a decade: log y
        fig.update_yaxes(type="log" if wide else "linear", row=row, col=1)
    fig = _layout(fig, "", "", height=60 + 170 * max(len(names), 1))
    fig.update_layout(showlegend=False, xaxis_title=None)
    fig.update_xaxes(title_text="step", row=max(len(names), 1), col=1)
    return fig


def histogram(values: Sequence[float], title: str, bands: Sequence[float] = (), bins: int = 50) -> go.Figure:
    """A histogram of per-latent values, with vertical lines at `bands` (e.g. the diffing class cuts)."""
    fig = go.Figure(go.Histogram(x=list(values), nbinsx=bins, marker_color=f"rgb{NEGATIVE}"))
    for x in bands:
        fig.add_vline(x=x, line_dash="dash", line_color="#d62728")
    fig = _layout(fig, title, "latents", height=280)
    fig.update_layout(showlegend=False)
    return fig


def scaling_scatter(df: Any) -> tuple[go.Figure, int]:
    """Latent Scaling: nu_error against nu_recon per latent, coloured by diffing class; each point's
    `customdata` is its feature id, so a selection names the latents to open. The view spans the
    bulk of the points (a few latents with tiny betas have ratios in the thousands); returns the
    figure and how many points lie outside the view."""
    fig = go.Figure()
    for cls, part in df.groupby("diff_class"):
        fig.add_trace(
            go.Scatter(
                x=part["nu_error"],
                y=part["nu_recon"],
                mode="markers",
                name=str(cls),
                customdata=part["feature"],
                marker={"size": 6, "opacity": 0.7},
                hovertemplate="#%{customdata}<br>nu_error %{x:.3f}<br>nu_recon %{y:.3f}<extra>" + str(cls) + "</extra>",
            )
        )
    hidden = np.zeros(len(df), dtype=bool)
    for axis, col in (("xaxis", "nu_error"), ("yaxis", "nu_recon")):
        values = df[col].to_numpy(dtype=float)
        lo, hi = np.quantile(values, [0.005, 0.995]) if len(values) else (0.0, 1.0)
        lo, hi = min(lo, 0.0), max(hi, 1.0)
        pad = 0.05 * (hi - lo)
        fig.update_layout({axis: {"range": [lo - pad, hi + pad]}})
        hidden |= (values < lo - pad) | (values > hi + pad)
    return _layout(fig, "nu_error (complete shrinkage)", "nu_recon (latent decoupling)", height=420), int(hidden.sum())


def steering_frontier(df: Any) -> go.Figure:
    """A steering sweep (`saelab.steering.sweep` rows) as effect against cost: one line per feature (and
    one for the difference-in-means baseline), each point labelled with its strength. Up and to the
    left is better: more change in the target tokens' log-probability per nat of KL."""
    fig = go.Figure()
    for (kind, feature), part in df.groupby(["kind", "feature"], sort=False):
        part = part.sort_values("strength")
        name = f"difference in means (for #{feature})" if kind == BASELINE_KIND else f"#{feature} ({kind})"
        fig.add_trace(
            go.Scatter(
                x=part["kl"],
                y=part["delta_logprob"],
                text=[f"{s:g}" for s in part["strength"]],
                mode="lines+markers+text",
                textposition="top left",
                name=name,
                line={"dash": "dot"} if kind == BASELINE_KIND else None,
                hovertemplate="strength %{text}<br>KL %{x:.4f}<br>Δ log P %{y:+.3f}<extra>" + name + "</extra>",
            )
        )
    return _layout(fig, "cost: KL(clean || steered), nats per token", "effect: Δ log P(target tokens)", height=400)


def selected_features(event: Any) -> list[int]:
    """Feature ids of the points selected in a `scaling_scatter` chart event (none without one)."""
    points = (getattr(event, "selection", None) or {}).get("points", []) if event is not None else []
    out = []
    for p in points:
        data = p.get("customdata")
        if isinstance(data, list):
            data = data[0] if data else None
        if data is not None:
            out.append(int(data))
    return sorted(set(out))


def _layout(fig: go.Figure, x: str, y: str, height: int) -> go.Figure:
    fig.update_layout(
        height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title=x, yaxis_title=y, showlegend=True
    )
    return fig
