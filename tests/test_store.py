"""FeatureStore: atomic publishing, typed reads, bad input, foreign files, injection, Parquet export."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_analysis import CFG, tiny_data, tiny_run

from saelab.analysis import analyze
from saelab.store import SORT_KEYS, FeatureStore, StoreError


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
        w.set_label("run-topk", 2, "new")
    with FeatureStore(store_path) as third:
        assert third.dashboard("run-topk", 2).summary.label == "new"
    assert first.dashboard("run-topk", 2).summary.label == "new"
    assert second.dashboard("run-topk", 2).summary.label == "new"
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
        with pytest.raises(StoreError, match="read-only"):
            store.set_label("run-topk", 0, "x")


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
    with pytest.raises(StoreError, match="schema v99; this saelab reads v4: upgrade saelab"):
        FeatureStore(store_path)


def test_older_store_is_read_as_is_and_upgraded_by_writers(store_path) -> None:
    # A v1 store is today's store without the steering (v2) and diffing (v3, v4) tables.
    con = duckdb.connect(str(store_path))
    con.execute("DROP TABLE steering")
    con.execute("DROP TABLE diffing")
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
        assert new.query("SELECT value FROM saelab_meta WHERE key = 'schema_version'")["value"][0] == "4"
        assert {"nu_error", "nu_recon"} <= set(new.query("SELECT * FROM diffing").columns)
        assert new.steering_experiments("run-topk") == []
        assert new.dashboard("run-topk", 1).summary.label == "upgraded"


def test_export_parquet(built, tmp_path) -> None:
    with FeatureStore(built) as store:
        files = store.export_parquet(tmp_path / "it's parquet")
        n_examples = store.query("SELECT count(*) AS n FROM examples")["n"][0]
    names = {f.name for f in files}
    assert {"features.parquet", "examples.parquet", "saes.parquet", "vocab.parquet", "diffing.parquet"} <= names
    assert pq.read_table(tmp_path / "it's parquet" / "features.parquet").num_rows == 80
    assert pq.read_table(tmp_path / "it's parquet" / "examples.parquet").num_rows == n_examples
