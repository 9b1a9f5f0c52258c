"""FeatureStore: atomic publishing, typed reads, bad input, foreign files, injection, Parquet export."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_analysis import CFG, tiny_data, tiny_run

from saelab.analysis import analyze
from saelab.store import SORT_KEYS, FeatureStore, StoreError
from saelab.store.schema import ADDED_COLUMNS, MIGRATIONS, SCHEMA_VERSION
from saelab.store.userdata import COMPACT_AT, user_dir


@pytest.fixture(scope="module")
def built(tiny_model, tiny_model_dir, corpus_dir, tmp_path_factory) -> Path:
    """A store holding two analysed SAEs (topk and relu) of the tiny model."""
    tmp = tmp_path_factory.mktemp("store")
    data = tiny_data(tiny_model_dir, corpus_dir)
    path = tmp / "features.duckdb"
    analyze(tiny_run(tmp, "topk"), path, CFG, model=tiny_model, data=data)
    analyze(tiny_run(tmp, "relu"), path, CFG, model=tiny_model, data=data)
    return path


@pytest.fixture()
def store_path(built, tmp_path) -> Path:
    path = tmp_path / "copy.duckdb"
    shutil.copyfile(built, path)
    return path


def test_many_saes_in_one_store(built) -> None:
    with FeatureStore(built) as store:
        assert store.sae_ids() == ["run-relu", "run-topk"]
        assert store.sae("run-topk").sparsifier == "topk" and store.sae("run-relu").k is None
        # One query across SAEs, as a notebook would write it.
        df = store.query("SELECT sae_id, count(*) AS n FROM features GROUP BY sae_id ORDER BY sae_id")
        assert df["n"].tolist() == [40, 40]


def test_feature_list_filters_sorts_and_pages(built) -> None:
    with FeatureStore(built) as store:
        everything = store.feature_list("run-topk", sort="feature", descending=False, limit=1000).rows
        assert [r.feature for r in everything] == list(range(40))
        live = [r for r in everything if r.density > 0]
        lo, hi = sorted(r.density for r in live)[len(live) // 4], max(r.density for r in live)
        page = store.feature_list("run-topk", sort="max_act", min_density=lo, max_density=hi, limit=5, offset=2)
        want = sorted((r for r in everything if lo <= r.density <= hi), key=lambda r: (-r.max_act, r.feature))
        assert page.total == len(want)
        assert [r.feature for r in page.rows] == [r.feature for r in want[2:7]]
        for key in SORT_KEYS:
            store.feature_list("run-topk", sort=key, limit=3)
        # The strongest firing with min_context tokens of context, at most the strongest of all.
        by_ctx = store.feature_list("run-topk", sort="ctx_max_act", limit=1000).rows
        with_ctx = [r for r in by_ctx if r.ctx_max_act is not None]
        assert with_ctx and [r.ctx_max_act for r in with_ctx] == sorted((r.ctx_max_act for r in with_ctx), reverse=True)
        assert all(r.ctx_max_act <= r.max_act for r in with_ctx)


def test_reader_during_write_sees_the_old_complete_store(store_path) -> None:
    reader = FeatureStore(store_path)
    assert reader.sae_ids() == ["run-relu", "run-topk"]
    with FeatureStore.writer(store_path) as w:
        w.put_sae({"sae_id": "half-written", "d_sae": 3, "model": "m"})
        # Mid-write: an open reader and a newly opened one both see the old, complete store.
        assert reader.sae_ids() == ["run-relu", "run-topk"]
        with FeatureStore(store_path) as fresh:
            assert fresh.sae_ids() == ["run-relu", "run-topk"]
            assert fresh.dashboard("run-topk", 0).summary.feature == 0
    # Once published, the open reader reconnects and sees the new SAE.
    assert reader.sae_ids() == ["half-written", "run-relu", "run-topk"]
    reader.close()


def test_every_reader_in_a_process_sees_a_published_write(store_path) -> None:
    # DuckDB caches one database per path in a process; readers must not be pinned to the old file.
    first, second = FeatureStore(store_path), FeatureStore(store_path)
    with FeatureStore.writer(store_path) as w:
        w.put_sae({"sae_id": "new", "d_sae": 3, "model": "m"})
    with FeatureStore(store_path) as third:
        assert "new" in third.sae_ids()
    assert "new" in first.sae_ids() and "new" in second.sae_ids()
    first.close()
    second.close()


def test_failed_write_publishes_nothing(store_path) -> None:
    before = store_path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"), FeatureStore.writer(store_path) as w:
        w.put_sae({"sae_id": "run-topk", "d_sae": 1})  # would replace an SAE ...
        raise RuntimeError("boom")  # ... but the writer dies first
    assert store_path.read_bytes() == before
    assert [p.name for p in store_path.parent.iterdir() if ".writing" in p.name] == []
    with FeatureStore(store_path) as store:
        assert store.sae("run-topk").d_sae == 40


def test_search_is_injection_safe_and_literal(store_path) -> None:
    with FeatureStore.writer(store_path) as w:
        w.set_label("run-topk", 3, "100% of 'quotes' and under_scores")
    store = FeatureStore(store_path)
    for attack in ("'; DROP TABLE features; --", "%' OR 1=1 --", '"); DELETE FROM saes; --', "\\", "_", "%"):
        store.search("run-topk", attack)
        store.features_for_token("run-topk", attack)
    assert store.query("SELECT count(*) AS n FROM features")["n"][0] == 80
    assert store.sae_ids() == ["run-relu", "run-topk"]
    # Wildcards are literal: only the label that contains "100%" matches.
    assert [r.feature for r in store.search("run-topk", "100%")] == [3]
    assert [r.feature for r in store.search("run-topk", "under_s")] == [3]
    assert store.search("run-topk", "under%s") == []
    assert store.dashboard("run-topk", 3).summary.label == "100% of 'quotes' and under_scores"
    store.close()


def test_bad_requests_give_clear_errors(built) -> None:
    with FeatureStore(built) as store:
        with pytest.raises(StoreError, match=r"no SAE 'nope'.*run-relu"):
            store.dashboard("nope", 0)
        for bad in (40, -1, 10**12):
            with pytest.raises(StoreError, match=r"out of range.*0 \.\. 39"):
                store.dashboard("run-topk", bad)
        for bad in ("3", 2.0, True):
            with pytest.raises(StoreError, match="integers"):
                store.neighbours("run-topk", bad)
        assert store.dashboard("run-topk", np.int64(5)).summary.feature == 5
        with pytest.raises(StoreError, match="cannot sort by"):
            store.feature_list("run-topk", sort="density; DROP TABLE features")
        with pytest.raises(StoreError, match="token id"):
            store.features_for_token("run-topk", 10**9)
        with pytest.raises(StoreError, match=r"out of range.*0 \.\. 39"):
            store.set_label("run-topk", 40, "x")
        with pytest.raises(StoreError, match="a label is text"):
            store.set_label("run-topk", 0, 3)
        with pytest.raises(StoreError, match="no steering experiment 'nope'"):
            store.delete_steering("run-topk", "nope")
        assert not store.user.root.exists()  # nothing was saved


def test_foreign_corrupt_missing_and_newer_files(tmp_path, store_path) -> None:
    with pytest.raises(StoreError, match="no feature store at"):
        FeatureStore(tmp_path / "missing.duckdb")
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreError, match="not a readable DuckDB database"):
        FeatureStore(junk)
    with pytest.raises(StoreError, match="not a readable DuckDB database"), FeatureStore.writer(junk):
        pass
    assert junk.read_bytes() == b"\x00garbage" * 1000  # a writer never overwrites what it cannot read
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    with pytest.raises(StoreError, match=r"not a saelab feature store \(tables: \['t'\]\)"):
        FeatureStore(other)
    con = duckdb.connect(str(store_path))
    con.execute("UPDATE saelab_meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match="schema v99; this saelab reads v5: upgrade saelab"):
        FeatureStore(store_path)


def test_older_store_is_read_as_is_and_upgraded_by_writers(store_path) -> None:
    # A v1 store is today's store without the steering (v2) and diffing (v3, v4) tables, ctx_max_act and
    # max_token_id (v5).
    con = duckdb.connect(str(store_path))
    expected = con.execute("SELECT max_token_id FROM examples ORDER BY ALL").fetchall()
    con.execute("DROP TABLE steering")
    con.execute("DROP TABLE diffing")
    con.execute("ALTER TABLE features DROP COLUMN ctx_max_act")
    con.execute("ALTER TABLE examples DROP COLUMN max_token_id")
    con.execute("UPDATE saelab_meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    with FeatureStore(store_path) as old:
        assert old.sae_ids() == ["run-relu", "run-topk"]
        assert old.dashboard("run-topk", 1).summary.feature == 1
        assert old.steering_experiments("run-topk") == []
        assert old.diffing_counts("run-topk") == {} and old.dashboard("run-topk", 1).diff_class is None
    with FeatureStore.writer(store_path) as w:
        w.set_label("run-topk", 1, "upgraded")
    with FeatureStore(store_path) as new:
        assert new.query("SELECT value FROM saelab_meta WHERE key = 'schema_version'")["value"][0] == "5"
        assert {"nu_error", "nu_recon"} <= set(new.query("SELECT * FROM diffing").columns)
        assert new.query("SELECT count(ctx_max_act) AS n FROM features")["n"][0] == 0  # analysed before v5
        got = new.query("SELECT max_token_id FROM examples ORDER BY ALL")["max_token_id"].tolist()
        assert got == [r[0] for r in expected]  # the migration recovers each example's token id
        assert new.steering_experiments("run-topk") == []
        assert new.dashboard("run-topk", 1).summary.label == "upgraded"


@pytest.mark.parametrize("version", [3, 4])
def test_reads_of_older_stores_see_added_columns_as_null(store_path, version) -> None:
    # A v4 store lacks features.ctx_max_act and examples.max_token_id (v5); a v3 store also diffing's
    # nu_error and nu_recon (v4).
    con = duckdb.connect(str(store_path))
    con.execute("ALTER TABLE features DROP COLUMN ctx_max_act")
    con.execute("ALTER TABLE examples DROP COLUMN max_token_id")
    if version == 3:
        con.execute("ALTER TABLE diffing DROP COLUMN nu_error")
        con.execute("ALTER TABLE diffing DROP COLUMN nu_recon")
    con.execute("UPDATE saelab_meta SET value = ? WHERE key = 'schema_version'", [str(version)])
    con.close()
    with FeatureStore(store_path) as old:
        page = old.feature_list("run-topk", sort="ctx_max_act", limit=1000)
        assert page.total == 40 and all(r.ctx_max_act is None for r in page.rows)
        assert [r.feature for r in page.rows] == list(range(40))  # all NULL: by feature
        dash = old.dashboard("run-topk", page.rows[0].feature)
        assert dash.summary.ctx_max_act is None and dash.nu_error is None
        token = next(e for e in old.query("SELECT max_token FROM examples WHERE sae_id = 'run-topk'")["max_token"])
        assert old.search("run-topk", token)
        assert old.query("SELECT count(*) AS n FROM features WHERE ctx_max_act IS NULL")["n"][0] == 80
        assert {"nu_error", "nu_recon"} <= set(old.diffing("run-topk").columns)
        assert old.diffing_counts("run-topk", nu_below=0.3) == {}
    # The file itself is untouched by reading it.
    con = duckdb.connect(str(store_path), read_only=True)
    assert "ctx_max_act" not in {r[0] for r in con.execute("DESCRIBE features").fetchall()}
    con.close()


def test_added_columns_are_the_migrations_alter_statements() -> None:
    assert max(MIGRATIONS) + 1 == SCHEMA_VERSION
    for v, sql in MIGRATIONS.items():
        added: dict[str, dict[str, str]] = {}
        for table, col, typ in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+) (\w+)", sql):
            added.setdefault(table, {})[col] = typ
        assert ADDED_COLUMNS.get(v + 1, {}) == added, v


def test_export_parquet(built, tmp_path) -> None:
    with FeatureStore(built) as store:
        files = store.export_parquet(tmp_path / "it's parquet")
        n_examples = store.query("SELECT count(*) AS n FROM examples")["n"][0]
    names = {f.name for f in files}
    assert {"features.parquet", "examples.parquet", "saes.parquet", "vocab.parquet", "diffing.parquet"} <= names
    assert pq.read_table(tmp_path / "it's parquet" / "features.parquet").num_rows == 80
    assert pq.read_table(tmp_path / "it's parquet" / "examples.parquet").num_rows == n_examples


def _search_by_definition(store: FeatureStore, sae_id: str, text: str) -> tuple[list[int], int]:
    """`search` computed in Python from the store's rows, without a limit, and how many features have
    top examples on a matching token. Features whose label, top-example tokens or promoted tokens
    contain `text` (case-insensitive); matching labels first (then other labels, then unlabelled
    features, as SQL's NULLS LAST orders the label match), then by matching top examples, then by
    max_act (NULL last), then by id."""
    needle = text.lower()

    def has(s: str | None) -> bool:
        return s is not None and needle in s.lower()

    examples = store.con.execute(
        "SELECT feature, max_token FROM examples WHERE sae_id = ? AND kind = 'top'", [sae_id]
    ).fetchall()
    hits: dict[int, int] = {}
    for f, token in examples:
        if has(token):
            hits[f] = hits.get(f, 0) + 1
    features = store.con.execute(
        "SELECT feature, label, pos_tokens, max_act FROM features WHERE sae_id = ?", [sae_id]
    ).fetchall()
    found = [
        (0 if has(label) else 1 if label is not None else 2, -hits.get(f, 0), m is None, -(m or 0.0), f)
        for f, label, pos, m in features
        if f in hits or has(label) or any(has(t) for t in pos or [])
    ]
    return [key[-1] for key in sorted(found)], len(hits)


def test_search_matches_its_definition_with_and_without_vocab(store_path, tmp_path) -> None:
    # Give three tokens awkward texts (wildcards, a backslash, quotes), everywhere their text is stored:
    # two tokens top examples peak on and one only promoted.
    con = duckdb.connect(str(store_path))
    (model,) = con.execute("SELECT model FROM saes WHERE sae_id = 'run-topk'").fetchone()
    texts = dict(con.execute("SELECT token_id, token FROM vocab WHERE model = ?", [model]).fetchall())
    unique = {t: i for i, t in texts.items() if list(texts.values()).count(t) == 1}
    peaks = con.execute(
        "SELECT max_token FROM examples WHERE sae_id = 'run-topk' AND kind = 'top' GROUP BY 1 ORDER BY count(*) DESC"
    ).fetchall()
    on_examples = [unique[t] for (t,) in peaks if t in unique][:2]
    promoted = {i for (ids,) in con.execute("SELECT pos_token_ids FROM features").fetchall() for i in ids}
    in_examples = {unique.get(t) for (t,) in con.execute("SELECT DISTINCT max_token FROM examples").fetchall()}
    only_promoted = min((promoted & set(unique.values())) - in_examples)
    for i, new in zip([*on_examples, only_promoted], ["50%_OFF", "back\\slash", 'it\'s "quoted"'], strict=True):
        con.execute("UPDATE examples SET max_token = ? WHERE max_token = ?", [new, texts[i]])
        con.execute("UPDATE vocab SET token = ? WHERE model = ? AND token_id = ?", [new, model, i])
        texts[i] = new
    for sae_id, f, ids in con.execute("SELECT sae_id, feature, pos_token_ids FROM features").fetchall():
        con.execute(
            "UPDATE features SET pos_tokens = ? WHERE sae_id = ? AND feature = ?", [[texts[i] for i in ids], sae_id, f]
        )
    con.close()
    with FeatureStore.writer(store_path) as w:
        w.set_label("run-topk", 3, "100% of 'quotes' and under_scores")
        w.set_label("run-topk", 5, "C:\\Path\\50%")
        w.set_label("run-topk", 7, "")
        w.set_label("run-relu", 2, "Back\\Slash")
    no_vocab = tmp_path / "no-vocab.duckdb"
    shutil.copyfile(store_path, no_vocab)
    shutil.copytree(user_dir(store_path), user_dir(no_vocab))  # the labels travel with the store's user data
    con = duckdb.connect(str(no_vocab))
    con.execute("DELETE FROM vocab")
    con.close()

    common = peaks[0][0]
    queries = ["%", "_", "\\", "'", '"', "%_", "50%", "0%_o", "K\\S", "'S \"QUOTED", "100%", "under_s", "UNDER%S", ""]
    queries += [common, common.upper(), common[1:], "no such text", "'; DROP TABLE features; --", "%' OR 1=1 --"]
    with FeatureStore(store_path) as store, FeatureStore(no_vocab) as fallback:
        assert store.has_vocab(model) and not fallback.has_vocab(model)
        for sae_id in ("run-topk", "run-relu"):
            for text in queries:
                ranked, n_hits = _search_by_definition(store, sae_id, text)
                for limit in sorted({1, 3, 50, 1000, n_hits, n_hits + 1}):
                    got = store.search(sae_id, text, limit)
                    assert [r.feature for r in got] == ranked[:limit], (sae_id, text, limit)
                    assert fallback.search(sae_id, text, limit) == got, (sae_id, text, limit)
        # The awkward tokens are found where their texts are stored.
        assert store.search("run-topk", "50%_off") and store.search("run-topk", "back\\slash")
        assert store.search("run-topk", 'it\'s "quoted"')
        assert store.search("run-topk", "50\\%_off") == store.search("run-topk", "5_%") == []


def _sweep(strengths: list[float], feature: int = 1) -> pd.DataFrame:
    n = len(strengths)
    return pd.DataFrame(
        {
            "feature": [feature] * n,
            "kind": ["add"] * n,
            "units": ["max"] * n,
            "strength": strengths,
            "kl": [0.1 * s for s in strengths],
            "delta_logprob": [0.5 * s for s in strengths],
            "targets": ["a|b"] * n,
        }
    )


def test_labels_and_experiments_are_saved_beside_the_store(store_path) -> None:
    reader = FeatureStore(store_path)
    published = store_path.stat()
    reader.set_label("run-topk", 4, "thou / thee")
    reader.put_steering("run-topk", "sweep 1", _sweep([0.0, 1.0, 2.0]), settings={"f": "1:2", "prompts": ["To be"]})
    now = store_path.stat()
    assert (now.st_ino, now.st_mtime_ns) == (published.st_ino, published.st_mtime_ns)  # nothing republished
    assert reader.dashboard("run-topk", 4).summary.label == "thou / thee"
    assert reader.search("run-topk", "THEE")[0].feature == 4
    assert reader.feature_list("run-relu", limit=None).rows[4].label is None  # another SAE's feature 4

    # After a restart they are all there, and the latest save of a key wins.
    reader.close()
    with FeatureStore(store_path) as again:
        assert again.steering_experiments("run-topk") == ["sweep 1"]
        assert again.steering("run-topk", "sweep 1")["strength"].tolist() == [0.0, 1.0, 2.0]
        assert again.steering_settings("run-topk", "sweep 1") == {"f": "1:2", "prompts": ["To be"]}
        again.set_label("run-topk", 4, "thee, relabelled")
        again.put_steering("run-topk", "sweep 1", _sweep([5.0]))
        again.put_steering("run-topk", "sweep 2", _sweep([1.0], feature=2))
        assert again.dashboard("run-topk", 4).summary.label == "thee, relabelled"
        assert again.steering("run-topk", "sweep 1")["strength"].tolist() == [5.0]
        assert again.steering_settings("run-topk", "sweep 1") == {}
        again.delete_steering("run-topk", "sweep 2")
        again.set_label("run-topk", 4, None)
        assert again.steering_experiments("run-topk") == ["sweep 1"]
        assert again.dashboard("run-topk", 4).summary.label is None
        with pytest.raises(StoreError, match="name the experiment"):
            again.put_steering("run-topk", " ", _sweep([1.0]))
        with pytest.raises(StoreError, match="JSON"):
            again.put_steering("run-topk", "x", _sweep([1.0]), settings={"bad": object()})
        with pytest.raises(StoreError, match="no SAE 'nope'"):
            again.put_steering("nope", "x", _sweep([1.0]))

    # A publish keeps them; many saves are merged into few files, and nothing is lost in the merge.
    with FeatureStore.writer(store_path) as w:
        w.put_sae({"sae_id": "published later", "d_sae": 3, "model": "m"})
    with FeatureStore(store_path) as store:
        n = 3 * COMPACT_AT + 5
        for i in range(n):
            store.set_label("run-relu", i % 40, f"label {i}")
        assert len(list((user_dir(store_path) / "labels").iterdir())) <= COMPACT_AT
        labels = {r.feature: r.label for r in store.feature_list("run-relu", limit=None).rows}
        assert labels == {f: f"label {max(range(f, n, 40))}" if f < n else None for f in range(40)}
        assert store.steering("run-topk", "sweep 1")["strength"].tolist() == [5.0]
        assert "published later" in store.sae_ids()


def test_older_stores_take_saved_experiments(store_path) -> None:
    con = duckdb.connect(str(store_path))
    con.execute("DROP TABLE steering")  # as in a v1 store
    con.execute("ALTER TABLE features DROP COLUMN ctx_max_act")
    con.execute("UPDATE saelab_meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    with FeatureStore(store_path) as old:
        old.put_steering("run-topk", "on v1", _sweep([1.0, 2.0]))
        old.set_label("run-topk", 2, "old but labelled")
        assert old.steering("run-topk", "on v1")["kl"].tolist() == pytest.approx([0.1, 0.2])
        assert old.dashboard("run-topk", 2).summary.label == "old but labelled"
        assert old.dashboard("run-topk", 2).summary.ctx_max_act is None


def test_saving_while_another_process_publishes_an_analysis_loses_neither(
    store_path, tiny_model_dir, corpus_dir, tmp_path
) -> None:
    script = tmp_path / "publish.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from pathlib import Path
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_analysis import CFG, tiny_data, tiny_run
            from saelab.analysis import analyze
            data = tiny_data(Path({str(tiny_model_dir)!r}), Path({str(corpus_dir)!r}))
            run = tiny_run(Path({str(tmp_path)!r}), "relu", seed=1)
            analyze(run, {str(store_path)!r}, CFG, sae_id="fresh", data=data)
            """
        )
    )
    reader = FeatureStore(store_path)
    child = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    saved = 0
    while child.poll() is None or saved < 10:  # saves before, during and after the publish
        reader.put_steering("run-topk", f"experiment {saved}", _sweep([float(saved)]))
        reader.set_label("run-topk", saved % 40, f"label {saved}")
        saved += 1
        time.sleep(0.005)
    assert child.wait() == 0, child.stderr.read()
    with FeatureStore(store_path) as after:
        for store in (reader, after):
            assert "fresh" in store.sae_ids() and store.feature_list("fresh").total == 40
            assert sorted(store.steering_experiments("run-topk")) == sorted(f"experiment {i}" for i in range(saved))
            labels = {r.feature: r.label for r in store.feature_list("run-topk", limit=None).rows}
            assert all(labels[i % 40] == f"label {i}" for i in range(max(0, saved - 40), saved))
    reader.close()
