"""The Streamlit app, driven page by page with AppTest on a small real store (a trained tiny SAE, a
two-layer crosscoder and a random signed SAE, analysed on the tiny model), and its HTML/figure builders."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from streamlit.testing.v1 import AppTest

from saelab.app import MAIN, STORE_ENV, render
from saelab.cli import main
from saelab.store import Example, FeatureStore

TIMEOUT = 60


def page(store: Path, path: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None, **params: str) -> AppTest:
    """Run the app on `store` at page `path` ('views/feature.py', ...) with URL parameters `params`."""
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    if path is not None:
        at.switch_page(path)
        for k, v in params.items():
            at.query_params[k] = v
        at.run()
    return at


@pytest.fixture
def store(app_store, monkeypatch) -> Path:
    """The app reads the shared store."""
    monkeypatch.setenv(STORE_ENV, str(app_store))
    return app_store


def ok(at: AppTest) -> AppTest:
    """`at` after a run that raised nothing and showed no error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def texts(at: AppTest) -> str:
    """Everything the page says in text: markdown, captions, titles, metrics, messages and HTML."""
    parts = [*at.markdown, *at.caption, *at.title, *at.header, *at.subheader, *at.info, *at.warning, *at.error]
    out = [str(p.value) for p in parts]
    out += [f"{m.label} {m.value}" for m in at.metric]
    out += [str(h.proto.body) for h in at.get("html")]
    return "\n".join(out)


def test_overview_lists_every_sae_with_its_settings_and_evals(store) -> None:
    at = ok(page(store))
    table = at.dataframe[0].value
    assert list(table["SAE"]) == ["cc", "sae", "signed"]
    row = table.set_index("SAE").loc["sae"]
    assert row["sparsifier"] == "topk" and row["d_sae"] == 64 and row["tokens analysed"] > 0
    assert row["FVU"] > 0 and row["L0"] == pytest.approx(4.0)
    with FeatureStore(store) as fs:
        assert row["dead"] == fs.sae("sae").n_dead
    assert {m.label for m in at.metric} >= {"features", "dead", "FVU", "CE recovered", "L0"}
    assert len(at.get("plotly_chart")) == 2  # training curves and the density histogram


def test_overview_compares_saes_side_by_side(store) -> None:
    at = ok(page(store, sae="sae"))
    at.multiselect(key="compare_sae").set_value(["cc", "signed"]).run()
    ok(at)
    side = at.dataframe[1].value
    assert list(side.columns) == ["sae", "cc", "signed"] and "FVU" in side.index
    density = at.get("plotly_chart")[1]
    assert density.proto.spec.count('"name":') >= 3  # one overlaid histogram per SAE


def test_features_sorted_by_density_put_the_densest_first(store) -> None:
    at = ok(page(store, "views/features.py", sae="sae", sort="density"))
    rows = at.dataframe[0].value
    assert rows["density"].is_monotonic_decreasing
    with FeatureStore(store) as fs:
        densest = fs.feature_list("sae", "density", limit=1).rows[0]
    assert rows["feature"].iloc[0] == densest.feature
    assert rows["open"].iloc[0] == f"./feature?sae=sae&id={densest.feature}"
    at = ok(page(store, "views/features.py", sae="sae", sort="feature", order="asc"))
    assert list(at.dataframe[0].value["feature"][:3]) == [0, 1, 2]


def test_features_search_by_text_token_and_id(store) -> None:
    with FeatureStore(store) as fs:
        ex = fs.dashboard("sae", fs.feature_list("sae", "max_act", limit=1).rows[0].feature).top_examples[0]
    token = ex.tokens[ex.index]
    at = ok(page(store, "views/features.py", sae="sae", q=token, by="token"))
    assert ex and "examples on token" in at.dataframe[0].value.columns
    with FeatureStore(store) as fs:
        expected = [f for f, _, _ in fs.features_for_token("sae", token, limit=200)]
    assert list(at.dataframe[0].value["feature"]) == expected
    at = ok(page(store, "views/features.py", sae="sae", q=token.strip() or token, by="text"))
    assert len(at.dataframe[0].value) > 0
    at = ok(page(store, "views/features.py", sae="sae", q="#7", by="id"))
    assert list(at.dataframe[0].value["feature"]) == [7]
    at = page(store, "views/features.py", sae="sae", q="999", by="id")
    assert "not a feature id" in at.error[0].value and not at.exception


def test_feature_list_filters(store) -> None:
    at = ok(page(store, "views/features.py", sae="signed", status="alive"))
    assert (at.dataframe[0].value["n_fires"] > 0).all()
    at.slider(key="neg").set_value(0.4).run()
    assert (ok(at).dataframe[0].value["neg_frac"] >= 0.4).all()
    at = ok(page(store, "views/features.py", sae="cc", cls="shared"))
    assert len(at.dataframe[0].value) > 0
    at = ok(page(store, "views/features.py", sae="sae", status="dead"))
    assert "0 features match" in texts(at) or (at.dataframe[0].value["n_fires"] == 0).all()


def test_search_text_with_quotes_or_sql_is_harmless(store) -> None:
    for q in ("'; DROP TABLE features; --", '" OR 1=1 --', "%", "_", "\\"):
        at = ok(page(store, "views/features.py", sae="sae", q=q, by="text"))
        assert "features match" in texts(at)
    with FeatureStore(store) as fs:
        assert len(fs.feature_list("sae", limit=None).rows) == 64


def test_downloads_hold_the_filtered_list(store) -> None:
    at = ok(page(store, "views/features.py", sae="sae", status="alive"))
    labels = [b.proto.label for b in at.get("download_button")]
    assert any("CSV" in x for x in labels) and any("Parquet" in x for x in labels)


def test_dashboard_shows_the_feature(store) -> None:
    with FeatureStore(store) as fs:
        f = fs.feature_list("sae", "max_act", limit=1).rows[0].feature
        dash = fs.dashboard("sae", f)
    at = ok(page(store, "views/feature.py", sae="sae", id=str(f)))
    said = texts(at)
    assert f"feature #{f}" in said and f"max activation {dash.summary.max_act:.4g}" in said
    ex = dash.top_examples[0]
    assert render.visible(ex.tokens[ex.index]) in said and f"{ex.act:+.3f}" in said
    assert "Band " in said and "% of firings" in said
    click(at, "Next")
    assert ok(at).query_params["id"] == str(f + 1) and f"feature #{f + 1}" in texts(at)


def test_dashboard_of_a_crosscoder_latent_shows_its_diffing(store) -> None:
    at = ok(page(store, "views/feature.py", sae="cc", id="3"))
    steer = next(p for p in at.get("page_link") if p.proto.label == "Steer with this feature")
    assert steer.proto.query_string == "sae=cc&f=3%3A1&units=max"  # prefills the steering page
    labels = {m.label for m in at.metric}
    assert {"decoder norms", "relative norm", "decoder cosine"} <= labels


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sae": "nope"}, "No SAE 'nope'"),
        ({"sae": "sae", "id": "64"}, "out of range"),
        ({"sae": "sae", "id": "-1"}, "out of range"),
        ({"sae": "sae", "id": "abc"}, "not a whole number"),
    ],
)
def test_bad_url_parameters_say_what_is_wrong(store, params, message) -> None:
    at = page(store, "views/feature.py", **params)
    assert not at.exception and message in at.error[0].value


def test_a_dead_feature_says_so(store) -> None:
    at = ok(page(store, "views/feature.py", sae="signed", id="0"))  # the fixture killed feature 0
    assert "is dead" in at.warning[0].value and not at.get("plotly_chart")
    assert {"density", "max activation"}.isdisjoint(m.label for m in at.metric)


def test_diffing_page(store) -> None:
    at = ok(page(store, "views/diffing.py", sae="cc"))
    with FeatureStore(store) as fs:
        counts = fs.diffing_counts("cc")
        leaning = fs.leaning("cc", 5)
    shown = {m.label: int(m.value.replace(",", "")) for m in at.metric}
    assert shown == {c: counts.get(c, 0) for c in ("A-only", "shared", "B-only")}
    assert len(at.get("plotly_chart")) == 3
    links = [p.proto.label for p in at.get("page_link")]
    assert any(lab.startswith(f"#{leaning['B']['feature'].iloc[0]} ") for lab in links)
    assert any("top examples from" in lab for lab in links)  # a mixture of two corpora


def test_diffing_page_on_a_plain_sae_says_it_needs_a_crosscoder(store) -> None:
    at = page(store, "views/diffing.py", sae="sae")
    assert not at.exception and "not a two-source crosscoder" in at.error[0].value and "cc" in at.error[0].value


def test_store_problems_get_a_message_not_a_traceback(app_store, tmp_path, monkeypatch) -> None:
    missing = tmp_path / "missing.duckdb"
    monkeypatch.setenv(STORE_ENV, str(missing))
    at = page(missing)
    assert not at.exception and "no feature store at" in at.error[0].value and "saelab analyze" in at.error[0].value

    empty = tmp_path / "empty.duckdb"
    with FeatureStore.writer(empty):
        pass
    monkeypatch.setenv(STORE_ENV, str(empty))
    for path in (None, "views/features.py", "views/feature.py", "views/diffing.py"):
        at = page(empty, path)
        assert not at.exception and "holds no SAEs yet" in at.error[0].value

    newer = tmp_path / "newer.duckdb"
    shutil.copyfile(app_store, newer)
    import duckdb

    with duckdb.connect(str(newer)) as con:
        con.execute("UPDATE saelab_meta SET value = '99' WHERE key = 'schema_version'")
    monkeypatch.setenv(STORE_ENV, str(newer))
    at = page(newer)
    assert not at.exception and "schema v99" in at.error[0].value and "upgrade saelab" in at.error[0].value

    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"not a database" * 100)
    monkeypatch.setenv(STORE_ENV, str(garbage))
    at = page(garbage)
    assert not at.exception and "not a readable DuckDB database" in at.error[0].value


def test_a_store_replaced_while_the_app_is_open(app_store, tmp_path, monkeypatch) -> None:
    live = tmp_path / "live.duckdb"
    shutil.copyfile(app_store, live)
    monkeypatch.setenv(STORE_ENV, str(live))
    at = ok(page(live, "views/feature.py", sae="sae", id="3"))
    assert "feature #3" in texts(at)
    # `saelab analyze` publishes a new file by renaming it over the old one.
    with FeatureStore.writer(tmp_path / "next.duckdb"):
        pass
    (tmp_path / "next.duckdb").replace(live)
    at.run()
    assert not at.exception and "holds no SAEs yet" in at.error[0].value
    shutil.copyfile(app_store, tmp_path / "again.duckdb")
    (tmp_path / "again.duckdb").replace(live)
    at.run()
    assert "feature #3" in texts(ok(at))


def ex(tokens: list[str], acts: list[float], index: int) -> Example:
    return Example("top", -1, 0, acts[index], 0, index, list(range(len(tokens))), tokens, acts, index)


def test_token_html_escapes_and_shows_whitespace() -> None:
    out = render.example_html(ex(["<b>x</b>", " a", "\n", "\t&", ""], [0.0, 1.0, 2.0, 0.5, 0.0], 2), scale=2.0)
    assert "<b>" not in out and "&lt;b&gt;x&lt;/b&gt;" in out
    glyph = '<span class="ws">{}</span>'.format
    assert glyph("\u00b7") + "a" in out and glyph("\u21e5") + "&amp;" in out
    assert glyph("\u21b5") in out and glyph("\u2205") in out
    assert out.count("sl-tok peak") == 1 and "\n" not in out.split("</span>", 1)[1]  # one line
    assert 'data-tip="&#x27; a&#x27;  id 1  act 1.000"' in out  # the hover: text, id, activation
    tricky = render.example_html(ex(['" onmouseover="alert(1)'], [1.0], 0), scale=1.0)
    assert 'onmouseover="alert' not in tricky


def test_token_colours_scale_with_activation_and_sign() -> None:
    assert render.background(0.0, 1.0) == "transparent"
    assert render.background(1.0, 2.0) == "rgba(255, 127, 14, 0.500)"
    assert render.background(-2.0, 2.0) == "rgba(31, 119, 180, 1.000)"
    assert render.background(5.0, 2.0).endswith("1.000)")  # clipped
    out = render.example_html(ex(["a", "b"], [-1.0, 1.0], 1), scale=1.0, before=1)
    assert "rgba(31, 119, 180" in out and "rgba(255, 127, 14" in out


def test_context_cut_keeps_the_peak() -> None:
    e = ex([f"t{i}" for i in range(10)], [0.0] * 5 + [1.0] + [0.0] * 4, 5)
    out = render.example_html(e, 1.0, before=2, after=1)
    assert [t for t in (f"t{i}" for i in range(10)) if f">{t}<" in out] == ["t3", "t4", "t5", "t6"]
    assert 'class="sl-tok peak"' in out and ">t5<" in out.split('class="sl-tok peak"')[1][:200]


def test_band_heading_and_figures() -> None:
    assert render.band_heading(1, [0, 1, 2, 3], [2, 6, 2]) == "Band 1: activation 1 to 2, 60.0% of firings (6)"
    fig = render.density_histogram({"a": ([-3, -2, -1], [1, 2]), "b": ([-3, -2, -1], [3, 4])})
    assert [t.name for t in fig.data] == ["a", "b"] and fig.layout.barmode == "overlay"
    metrics = {"loss": ([1, 2], [200.0, 9.0]), "l0": ([1, 2], [0.0, 4.0]), "fvu": ([1, 2], [0.5, 0.2])}
    curves = render.training_curves(metrics, ["loss", "l0", "fvu"])
    assert [curves.layout[f"yaxis{i}"].type for i in ("", "2", "3")] == ["log", "linear", "linear"]


def test_selected_scatter_points_name_their_features() -> None:
    event = SimpleNamespace(selection={"points": [{"customdata": 7}, {"customdata": [3]}, {"customdata": 7}, {"x": 1}]})
    assert render.selected_features(event) == [3, 7]
    assert render.selected_features(None) == []


def test_saelab_app_refuses_a_busy_port(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    assert "pick another --port" in capsys.readouterr().err


def test_sub_character_tokens_read_as_their_bytes(tiny_model) -> None:
    from saelab.analysis.weights import BYTE_LEVEL, byte_piece, vocab_texts

    stand_in = {b: c for c, b in BYTE_LEVEL.items()}
    assert byte_piece("".join(stand_in[b] for b in " \u2019".encode()[:3])) == " \\xe2\\x80"  # a cut-off quote
    assert byte_piece("".join(stand_in[b] for b in "caf\u00e9".encode())) == "caf\u00e9"
    assert byte_piece("<0xE2>") == "<0xE2>" and byte_piece("\u2581hello") is None and byte_piece(None) is None
    texts = vocab_texts(tiny_model)
    assert "\ufffd" not in "".join(texts) and len(set(texts)) == len(texts)  # every piece reads distinctly


def test_scaling_scatter_frames_the_bulk_and_counts_the_rest() -> None:
    import pandas as pd

    df = pd.DataFrame(
        {"feature": range(400), "diff_class": ["shared"] * 399 + ["B-only"], "nu_error": [0.1] * 399 + [0.2],
         "nu_recon": [0.2] * 399 + [1e4]}
    )  # fmt: skip
    fig, hidden = render.scaling_scatter(df)
    assert hidden == 1 and fig.layout.yaxis.range[1] < 2
    assert sorted(int(f) for t in fig.data for f in t.customdata) == list(range(400))


@pytest.mark.parametrize(
    "params",
    [
        {"page": "9999"},
        {"page": "x"},
        {"by": "nonsense", "q": "a"},
        {"density": "banana"},
        {"order": "up"},
        {"sort": "x; DROP"},
    ],
)
def test_malformed_list_parameters_fall_back_without_a_traceback(store, params) -> None:
    at = page(store, "views/features.py", sae="sae", **params)
    assert not at.exception and not at.error and "features match" in texts(at)
    if "sort" in params:
        assert "Cannot sort by" in at.warning[0].value


def test_moving_between_pages_keeps_the_chosen_sae(store) -> None:
    at = ok(page(store, "views/features.py", sae="signed"))
    at.switch_page("views/feature.py")
    at.query_params.clear()  # the sidebar's page links carry no parameters
    at.run()
    assert "signed · feature #0" in texts(ok(at)) and at.query_params["sae"] == "signed"
    at.selectbox[0].select("cc").run()  # the sidebar's SAE box
    assert "cc · feature #0" in texts(ok(at)) and at.query_params["sae"] == "cc"


PROMPT = "To be, or not to be, that is the question"


def test_inspector_lists_the_features_at_a_token(store) -> None:
    from saelab.prompt import run_prompt
    from saelab.rundir import RunDir

    with FeatureStore(store) as fs:
        run = RunDir(fs.sae("sae").run_dir).load()
    expected = run_prompt(run.sae, run.sources, PROMPT)
    at = ok(page(store, "views/inspect.py", sae="sae", text=PROMPT, tok="3"))
    body = texts(at)
    assert "Features at token 3" in body and f"id {expected.token_ids[3]}" in body
    assert all(f'data-id="{t}"' in body for t in expected.token_ids)  # every token of the prompt is shown
    table = at.dataframe[0].value
    assert sorted(table["feature"]) == sorted(f for f, _ in expected.active(3))
    top = max(expected.active(3), key=lambda fv: abs(fv[1]))[0]
    assert table["feature"].iloc[0] == top and table["open"].iloc[0] == f"./feature?sae=sae&id={top}"
    at.segmented_control(key="rank").set_value("relative").run()
    assert ok(at).dataframe[0].value["relative"].is_monotonic_decreasing


def test_inspector_shows_a_crosscoder_latent_through_each_source(store) -> None:
    at = ok(page(store, "views/inspect.py", sae="cc", text=PROMPT))
    assert "through each source" in texts(at)
    sources = FeatureStore(store).sae("cc").params["sources"]
    table = at.dataframe[0].value
    assert [f"from {s}" for s in sources] == [c for c in table.columns if c.startswith("from ")]


@pytest.mark.parametrize(
    ("params", "message"),
    [({"text": "To be " * 200}, "reads at most"), ({"text": "a", "tok": "7"}, None), ({"text": "   "}, "empty")],
)
def test_inspector_bad_input(store, params, message) -> None:
    at = page(store, "views/inspect.py", sae="sae", **params)
    assert not at.exception
    if message:
        assert message in at.error[0].value


def test_inspector_without_the_run_directory_says_what_is_missing(app_store, tmp_path, monkeypatch) -> None:
    moved = tmp_path / "moved.duckdb"
    shutil.copyfile(app_store, moved)
    import duckdb

    with duckdb.connect(str(moved)) as con:
        con.execute("UPDATE saes SET run_dir = '/nowhere/run' WHERE sae_id = 'sae'")
    monkeypatch.setenv(STORE_ENV, str(moved))
    at = page(moved, "views/inspect.py", sae="sae", text=PROMPT)
    assert not at.exception and "/nowhere/run" in at.error[0].value and "browsing pages work" in at.error[0].value
    ok(page(moved, "views/feature.py", sae="sae", id="1"))  # browsing is unaffected


def test_dashboard_runs_its_feature_on_a_typed_prompt(store) -> None:
    from saelab.prompt import run_prompt
    from saelab.rundir import RunDir

    with FeatureStore(store) as fs:
        run = RunDir(fs.sae("sae").run_dir).load()
    got = run_prompt(run.sae, run.sources, PROMPT)
    f = int(got.indices[got.indices >= 0][0])
    values = got.feature(f)
    at = ok(page(store, "views/feature.py", sae="sae", id=str(f), **{"try": PROMPT}))
    peak = float(values[abs(values).argmax()])
    assert f"Feature #{f} on this prompt: max {peak:.4g}" in texts(at)
    assert f"prompt {peak:.3g}" in at.get("plotly_chart")[0].proto.spec  # marked on the histogram
    silent = next(g for g in range(64) if not (got.indices == g).any())
    at = ok(page(store, "views/feature.py", sae="sae", id=str(silent), **{"try": PROMPT}))
    assert f"Feature #{silent} does not fire on this prompt." in texts(at)


def click(at: AppTest, label: str) -> AppTest:
    """Click the button labelled `label` and rerun."""
    return next(b for b in at.button if b.label == label).click().run()


def click_key(at: AppTest, key: str) -> AppTest:
    """Click the button with widget key `key` and rerun."""
    return next(b for b in at.button if b.key == key).click().run()


@pytest.fixture
def own_store(app_store, tmp_path, monkeypatch) -> Path:
    """A copy of the shared store (and no saved data yet) for tests that save labels or experiments."""
    path = tmp_path / "features.duckdb"
    shutil.copyfile(app_store, path)
    monkeypatch.setenv(STORE_ENV, str(path))
    return path


def test_steering_page_generates_side_by_side(store) -> None:
    from saelab.rundir import RunDir
    from saelab.steering import Add, generate

    with FeatureStore(store) as fs:
        run = RunDir(fs.sae("sae").run_dir).load()
        max_acts = fs.max_acts("sae")
    model = run.sources[0][0]
    params = {"sae": "sae", "f": "5:40", "units": "raw", "prompt": "To be", "n": "8", "sweep": "0, 40", "tokens": "128"}
    at = click(ok(page(store, "views/steer.py", **params)), "Generate")
    shown = [t.value for t in ok(at).text]
    clean = generate(model, "To be", 8)
    steered = generate(model, "To be", 8, [Add(run.sae, [5], [40.0], units="raw", max_acts=max_acts)])
    assert shown == [clean, steered] and clean != steered  # a strong Add changes the continuation
    measured = ok(click(at, "Measure")).dataframe[0].value
    assert measured["strength"].tolist() == [0.0, 40.0] and set(measured["kind"]) == {"add"}
    assert measured["kl"].iloc[0] == pytest.approx(0.0, abs=1e-6) and measured["kl"].iloc[1] > 0
    assert measured["delta_logprob"].iloc[1] > 0  # it raises its promoted tokens' log-probability
    assert len(at.get("plotly_chart")) == 1  # effect against KL


def test_a_steering_sweep_with_its_baseline_is_saved_and_listed_after_a_restart(own_store) -> None:
    params = {"sae": "sae", "f": "5:1", "units": "max", "prompt": "To be", "sweep": "0, 1, 4", "tokens": "128",
              "targets": " the", "pos": "the king\nthe queen", "neg": "a dog\na cat"}  # fmt: skip
    at = ok(click(page(own_store, "views/steer.py", **params), "Measure"))
    measured = at.dataframe[0].value
    assert sorted(set(measured["kind"])) == ["add", "diff_in_means"] and len(measured) == 6
    assert measured["targets"].nunique() == 1 and "the" in measured["targets"].iloc[0]  # one target, ' the'
    assert measured.groupby("kind")["kl"].max().gt(0).all()
    at.text_input(key="save_name").input("king sweep").run()
    ok(click_key(at, "save_experiment"))

    restarted = ok(page(own_store, "views/steer.py", sae="sae"))  # a new session: nothing in memory
    assert restarted.selectbox(key="experiment").options == ["king sweep"]
    saved = restarted.dataframe[0].value
    measured = measured.sort_values(["kind", "strength"])
    assert saved[["kind", "strength"]].values.tolist() == measured[["kind", "strength"]].values.tolist()
    assert saved["kl"].tolist() == pytest.approx(measured["kl"].tolist())
    link = restarted.get("page_link")[0].proto
    assert link.label == "Open its settings" and "sweep=0%2C+1%2C+4" in link.query_string
    with FeatureStore(own_store) as fs:
        assert fs.steering_settings("sae", "king sweep")["f"] == "5:1"
    ok(click_key(restarted, "delete_experiment"))
    with FeatureStore(own_store) as fs:
        assert fs.steering_experiments("sae") == []


def test_a_label_typed_on_the_dashboard_is_kept(own_store) -> None:
    at = ok(page(own_store, "views/feature.py", sae="sae", id="3"))
    at.text_input[0].input("my favourite feature")
    ok(click(at, "Save label"))
    again = ok(page(own_store, "views/feature.py", sae="sae", id="3"))
    assert "my favourite feature" in [h.value for h in again.subheader]
    listed = ok(page(own_store, "views/features.py", sae="sae", q="FAVOURITE"))
    assert listed.dataframe[0].value["feature"].tolist()[0] == 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"f": "x:1"}, "is not a feature id"),
        ({"f": "5:abc"}, "is not a number"),
        ({"f": "999:1"}, "out of range"),
        ({"f": ","}, "at least one"),
        ({"f": "5:1", "prompt": " "}, "at least one prompt"),
    ],
)
def test_steering_bad_input(store, params, message) -> None:
    at = page(store, "views/steer.py", sae="sae", **params)
    assert not at.exception and message in at.error[0].value


@pytest.mark.parametrize(
    ("params", "message"),
    [({"sweep": "1, x"}, "'x' is not a number"), ({"targets": " the king of"}, "give single tokens")],
)
def test_steering_bad_sweep_input(store, params, message) -> None:
    at = click(page(store, "views/steer.py", sae="sae", f="5:1", tokens="128", **params), "Measure")
    assert not at.exception and message in at.error[0].value


def test_steering_a_prompt_longer_than_the_context_says_so(store) -> None:
    at = click(page(store, "views/steer.py", sae="sae", f="5:1", prompt="To be " * 200), "Generate")
    assert not at.exception and "reads at most" in at.error[0].value


def test_steering_either_model_of_a_crosscoder(store) -> None:
    at = ok(page(store, "views/steer.py", sae="cc", f="1:40", units="raw", src="1", prompt="To be", n="6"))
    clean, steered = [t.value for t in ok(click(at, "Generate")).text]
    assert clean != steered
    assert ok(page(store, "views/steer.py", sae="cc", f="1:1", src="3")).segmented_control(key="src").value == 0
    refused = page(store, "views/steer.py", sae="cc", f="1:1", kind="clamp")
    assert not refused.exception and "not clamped or ablated" in refused.error[0].value
