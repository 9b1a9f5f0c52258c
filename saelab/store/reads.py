"""Every query the CLI, the notebooks and the app make of a feature store, as typed methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import DataError, StoreError, check_feature_id
from saelab.store.connection import Connection, sql_literal
from saelab.store.records import (
    DIFFING_COLUMNS,
    EXAMPLE_COLUMNS,
    STEERING_COLUMNS,
    Example,
    FeatureDashboard,
    FeaturePage,
    FeatureSummary,
    SAEInfo,
    columns,
)
from saelab.store.schema import SORT_KEYS, TABLES

SUMMARY = ", ".join(columns(FeatureSummary))


def _edges(max_act: float | None, n: int) -> list[float]:
    """Edges of `n` equal-width bins over (0, max_act] (none for a feature that never fired)."""
    if max_act is None or n == 0:
        return []
    return [max_act * i / n for i in range(n + 1)]


class Reads(Connection):
    """The read methods of `FeatureStore`."""

    def sae_ids(self) -> list[str]:
        """Ids of the stored SAEs, sorted."""
        return [r[0] for r in self._rows("SELECT sae_id FROM saes ORDER BY sae_id")]

    def sae(self, sae_id: str) -> SAEInfo:
        """One SAE's metadata; a clear error naming the stored SAEs when `sae_id` is unknown."""
        rows = self._dicts(f"SELECT {', '.join(columns(SAEInfo))} FROM saes WHERE sae_id = ?", [sae_id])
        if not rows:
            raise StoreError(f"no SAE {sae_id!r} in {self.path}; stored: {self.sae_ids()}")
        return SAEInfo.from_row(rows[0])

    def _check_feature(self, sae_id: str, feature: int, info: SAEInfo | None = None) -> int:
        """`feature` as an int, or a clear error if it is not a feature id of the SAE."""
        try:
            return check_feature_id(feature, (info or self.sae(sae_id)).d_sae)
        except DataError as e:
            raise StoreError(f"SAE {sae_id!r}: {e}") from None

    def vocab(self, model: str) -> list[str]:
        """Token texts of `model`, indexed by token id (cached)."""
        if model not in self._vocab:
            rows = self._rows("SELECT token_id, token FROM vocab WHERE model = ? ORDER BY token_id", [model])
            table = [""] * (rows[-1][0] + 1 if rows else 0)
            for i, tok in rows:
                table[i] = tok
            self._vocab[model] = table
        return self._vocab[model]

    def token_texts(self, model: str, token_ids: list[int]) -> list[str]:
        """The texts of `token_ids` in `model`'s vocabulary (`<id>` for ids past it)."""
        vocab = self.vocab(model)
        return [vocab[i] if i < len(vocab) else f"<{i}>" for i in token_ids]

    def has_vocab(self, model: str) -> bool:
        """Whether token texts for `model` are stored."""
        return bool(self._rows("SELECT count(*) FROM vocab WHERE model = ?", [model])[0][0])

    def feature_list(
        self,
        sae_id: str,
        sort: str = "density",
        descending: bool = True,
        min_density: float | None = None,
        max_density: float | None = None,
        offset: int = 0,
        limit: int | None = 50,
        diff_class: str | None = None,
        fired: bool | None = None,
        min_neg_frac: float | None = None,
    ) -> FeaturePage:
        """A page of features sorted by `sort` (all of them with `limit=None`), filtered by firing density,
        by whether they fired at all (`fired`), by their share of negative firings (signed SAEs) and, for
        crosscoders, by diffing class."""
        self.sae(sae_id)
        if sort not in SORT_KEYS:
            raise StoreError(f"cannot sort by {sort!r}; choose one of {SORT_KEYS}")
        where, params = ["sae_id = ?"], [sae_id]
        if diff_class is not None:
            if not self._has_table("diffing"):
                return FeaturePage(0, [])
            where.append("feature IN (SELECT feature FROM diffing WHERE sae_id = ? AND diff_class = ?)")
            params += [sae_id, diff_class]
        for cond, value in (
            ("density >= ?", min_density),
            ("density <= ?", max_density),
            ("neg_frac >= ?", min_neg_frac),
        ):
            if value is not None:
                where.append(cond)
                params.append(value)
        if fired is not None:
            where.append("n_fires > 0" if fired else "n_fires = 0")
        cond = " AND ".join(where)
        total = self._rows(f"SELECT count(*) FROM features WHERE {cond}", params)[0][0]
        order = f"{sort} {'DESC' if descending else 'ASC'} NULLS LAST, feature"
        rows = self._dicts(
            f"SELECT {SUMMARY} FROM features WHERE {cond} ORDER BY {order} LIMIT ? OFFSET ?",
            [*params, total if limit is None else int(limit), int(offset)],
        )
        return FeaturePage(total, [FeatureSummary(**r) for r in rows])

    def summaries(self, sae_id: str, features: list[int]) -> list[FeatureSummary]:
        """The feature-list rows of `features`, in the order given (ids the SAE lacks are skipped)."""
        self.sae(sae_id)
        rows = self._dicts(
            f"SELECT {SUMMARY} FROM features WHERE sae_id = ? AND feature IN (SELECT unnest(?))",
            [sae_id, [int(f) for f in features]],
        )
        by_id = {r["feature"]: FeatureSummary(**r) for r in rows}
        return [by_id[f] for f in features if f in by_id]

    def fired_features(self, sae_id: str) -> list[int]:
        """Ids of the features that fired at least once in the analysis, ascending."""
        self.sae(sae_id)
        return [
            r[0]
            for r in self._rows("SELECT feature FROM features WHERE sae_id = ? AND n_fires > 0 ORDER BY 1", [sae_id])
        ]

    def dashboard(self, sae_id: str, feature: int) -> FeatureDashboard:
        """One feature's dashboard: summary, histograms, examples, logit effects and neighbours."""
        info = self.sae(sae_id)
        feature = self._check_feature(sae_id, feature, info)
        (row,) = self._dicts(
            f"SELECT {SUMMARY}, hist_counts, band_counts, pos_tokens, pos_logits, neg_tokens, neg_logits,"
            " neighbours, neighbour_cos FROM features WHERE sae_id = ? AND feature = ?",
            [sae_id, feature],
        )
        summary = FeatureSummary(**{c: row[c] for c in columns(FeatureSummary)})
        hist, bands = row["hist_counts"] or [], row["band_counts"] or []
        top, banded = self._examples(sae_id, feature, info.model)
        return FeatureDashboard(
            sae_id=sae_id,
            summary=summary,
            hist_edges=_edges(summary.max_act, len(hist)),
            hist_counts=list(hist),
            band_edges=_edges(summary.max_act, len(bands)),
            band_counts=list(bands),
            top_examples=top,
            band_examples=banded,
            promoted=list(zip(row["pos_tokens"] or [], row["pos_logits"] or [], strict=True)),
            suppressed=list(zip(row["neg_tokens"] or [], row["neg_logits"] or [], strict=True)),
            neighbours=list(zip(row["neighbours"] or [], row["neighbour_cos"] or [], strict=True)),
            **self._diffing_row(sae_id, feature),
        )

    def _examples(self, sae_id: str, feature: int, model: str) -> tuple[list[Example], dict[int, list[Example]]]:
        """A feature's top examples (strongest first) and band samples by band."""
        top: list[Example] = []
        banded: dict[int, list[Example]] = {}
        for r in self._dicts(
            f"SELECT {', '.join(EXAMPLE_COLUMNS)} FROM examples"
            " WHERE sae_id = ? AND feature = ? ORDER BY kind DESC, band, rank",
            [sae_id, feature],
        ):
            start = r.pop("start")
            tokens = self.token_texts(model, r["token_ids"])
            ex = Example(**r, tokens=tokens, index=r["pos"] - start)
            (top if ex.kind == "top" else banded.setdefault(ex.band, [])).append(ex)
        return top, banded

    def _diffing_row(self, sae_id: str, feature: int) -> dict[str, Any]:
        if not self._has_table("diffing"):
            return {}
        rows = self._dicts(
            f"SELECT {', '.join(DIFFING_COLUMNS)} FROM diffing WHERE sae_id = ? AND feature = ?", [sae_id, feature]
        )
        return rows[0] if rows else {}

    def promoted_tokens(self, sae_id: str, features: list[int], n: int = 3) -> dict[int, list[str]]:
        """The `n` tokens each of `features` most promotes, by feature (for the feature list)."""
        self.sae(sae_id)
        rows = self._rows(
            "SELECT feature, pos_tokens[1:?] FROM features WHERE sae_id = ? AND feature IN (SELECT unnest(?))",
            [int(n), sae_id, [int(f) for f in features]],
        )
        return {f: list(t or []) for f, t in rows}

    def neighbours(self, sae_id: str, feature: int) -> list[tuple[int, float]]:
        """Nearest features by decoder cosine similarity, closest first."""
        feature = self._check_feature(sae_id, feature)
        (row,) = self._rows(
            "SELECT neighbours, neighbour_cos FROM features WHERE sae_id = ? AND feature = ?", [sae_id, feature]
        )
        return list(zip(row[0] or [], row[1] or [], strict=True))

    def features_for_token(self, sae_id: str, token: str | int, limit: int = 20) -> list[tuple[int, int, float]]:
        """Features whose top examples peak on `token` (text or id): (feature, examples, max act)."""
        info = self.sae(sae_id)
        if isinstance(token, int):
            vocab = self.vocab(info.model)
            if not 0 <= token < len(vocab):
                raise StoreError(f"token id {token} is out of range for {info.model} (vocabulary of {len(vocab)})")
            token = vocab[token]
        return self._rows(
            "SELECT feature, count(*) AS n, max(abs(act)) AS top FROM examples"
            " WHERE sae_id = ? AND kind = 'top' AND max_token = ? GROUP BY feature ORDER BY n DESC, top DESC LIMIT ?",
            [sae_id, token, int(limit)],
        )

    def search(self, sae_id: str, text: str, limit: int = 50) -> list[FeatureSummary]:
        """Features whose label, top-example tokens or promoted tokens contain `text` (case-insensitive):
        label hits first, then by the number of top examples peaking on a matching token, then by max_act.

        `text` is matched literally: SQL wildcards in it are escaped, and it is always a bound parameter.
        """
        info = self.sae(sae_id)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        limit = int(limit)
        if self.has_vocab(info.model):
            # Every example's token and every promoted token is one of the model's tokens: match the
            # pattern once against their texts, then find examples and promoted tokens by token id,
            # rather than matching (or even decompressing) the text of each of them. Unlabelled features found only
            # through their promoted tokens rank after every feature with a matching top example, so
            # when there are `limit` of those only labelled features' promoted tokens need a look.
            matched = (
                "matched AS MATERIALIZED (SELECT token_id FROM vocab WHERE model = ? AND token ILIKE ? ESCAPE '\\'),"
            )
            on_example = "max_token_id IN (SELECT token_id FROM matched)"
            promoted = """f.feature IN (
                SELECT feature FROM (
                    SELECT feature, unnest(pos_token_ids) AS id FROM features
                    WHERE sae_id = ? AND (label IS NOT NULL OR (SELECT count(*) FROM hits) < ?)
                ) WHERE id IN (SELECT token_id FROM matched)
            )"""
            params = [info.model, pattern, sae_id, sae_id, pattern, sae_id, limit, pattern, limit]
        else:
            matched, on_example = "", "max_token ILIKE ? ESCAPE '\\'"
            promoted = "EXISTS (SELECT 1 FROM unnest(f.pos_tokens) AS u(t) WHERE t ILIKE ? ESCAPE '\\')"
            params = [sae_id, pattern, sae_id, pattern, pattern, pattern, limit]
        rows = self._dicts(
            f"""
            WITH {matched} hits AS MATERIALIZED (
                SELECT feature, count(*) AS n FROM examples
                WHERE sae_id = ? AND kind = 'top' AND {on_example}
                GROUP BY feature
            )
            SELECT {", ".join(columns(FeatureSummary, prefix="f."))}
            FROM features f LEFT JOIN hits h ON h.feature = f.feature
            WHERE f.sae_id = ? AND (h.n IS NOT NULL OR f.label ILIKE ? ESCAPE '\\' OR {promoted})
            ORDER BY (f.label ILIKE ? ESCAPE '\\') DESC NULLS LAST, coalesce(h.n, 0) DESC, f.max_act DESC, f.feature
            LIMIT ?
            """,
            params,
        )
        return [FeatureSummary(**r) for r in rows]

    def train_metrics(self, sae_id: str) -> dict[str, tuple[list[int], list[float]]]:
        """Training curves: metric -> (steps, values)."""
        self.sae(sae_id)
        out: dict[str, tuple[list[int], list[float]]] = {}
        for metric, step, value in self._rows(
            "SELECT metric, step, value FROM train_metrics WHERE sae_id = ? ORDER BY metric, step", [sae_id]
        ):
            steps, values = out.setdefault(metric, ([], []))
            steps.append(step)
            values.append(value)
        return out

    def max_acts(self, sae_id: str) -> np.ndarray:
        """Each feature's max |activation| [d_sae] (NaN where it never fired): the scale of `units='max'`."""
        info = self.sae(sae_id)
        out = np.full(info.d_sae, np.nan)
        for f, m in self._rows("SELECT feature, max_act FROM features WHERE sae_id = ?", [sae_id]):
            out[f] = np.nan if m is None else m
        return out

    def diffing(self, sae_id: str) -> Any:
        """Per-latent diffing metrics of a crosscoder as a DataFrame (empty for an SAE)."""
        self.sae(sae_id)
        if not self._has_table("diffing"):
            return self.query("SELECT NULL AS feature WHERE false")
        return self.query(
            f"SELECT feature, {', '.join(DIFFING_COLUMNS)} FROM diffing WHERE sae_id = ? ORDER BY feature",
            [sae_id],
        )

    def leaning(self, sae_id: str, top: int = 5) -> dict[str, Any]:
        """The `top` fired latents of a two-source crosscoder leaning most to each source, as DataFrames of
        `diffing` rows: 'A' from the lowest relative norm up, 'B' from the highest down.

        Only latents that fired in the analysis are listed (by n_fires, not by a finite nu: stores
        analysed before schema v4 have no Latent Scaling ratios).
        """
        df = self.diffing(sae_id)
        if "rel_norm" not in df or df["rel_norm"].isna().all():
            raise StoreError(f"{sae_id!r} has no diffing metrics: analyse a two-source crosscoder to get them")
        fired = df[df["feature"].isin(self.fired_features(sae_id))]
        return {name: fired.sort_values("rel_norm", ascending=name == "A").head(top) for name in ("A", "B")}

    def diffing_counts(self, sae_id: str, nu_below: float | None = None) -> dict[str, int]:
        """How many latents of a two-source crosscoder fall in each diffing class.

        With `nu_below`, count only latents whose Latent Scaling ratios (nu_error and nu_recon) are
        both below it: the source-specific latents that are not shrinkage or decoupling artifacts.
        """
        self.sae(sae_id)
        if not self._has_table("diffing"):
            return {}
        where, params = "sae_id = ? AND diff_class IS NOT NULL", [sae_id]
        if nu_below is not None:
            where += " AND nu_error < ? AND nu_recon < ?"
            params += [nu_below, nu_below]
        return dict(self._rows(f"SELECT diff_class, count(*) FROM diffing WHERE {where} GROUP BY 1", params))

    def example_origins(self, sae_id: str, n_parts: int) -> Any:
        """Counts of each feature's top examples by `seq % n_parts`: which corpus of an n-corpus mixture
        they came from (`saelab.config.mixture_parts`). A DataFrame, one row per feature with top
        examples, one column per part."""
        self.sae(sae_id)
        if n_parts < 1:
            raise StoreError(f"n_parts must be >= 1, got {n_parts}")
        df = self.query(
            "SELECT feature, seq % ? AS part, count(*) AS n FROM examples WHERE sae_id = ? AND kind = 'top'"
            " GROUP BY ALL",
            [n_parts, sae_id],
        )
        return df.pivot(index="feature", columns="part", values="n").fillna(0).astype(int)

    def steering_experiments(self, sae_id: str) -> list[str]:
        """Names of the steering experiments stored for an SAE."""
        self.sae(sae_id)
        if not self._has_table("steering"):
            return []
        return [
            r[0] for r in self._rows("SELECT DISTINCT experiment FROM steering WHERE sae_id = ? ORDER BY 1", [sae_id])
        ]

    def _check_experiment(self, sae_id: str, experiment: str) -> None:
        """A clear error, naming the stored ones, unless `experiment` is stored for the SAE."""
        stored = self.steering_experiments(sae_id)
        if experiment not in stored:
            raise StoreError(f"no steering experiment {experiment!r} for {sae_id!r}; stored: {stored}")

    def steering(self, sae_id: str, experiment: str) -> Any:
        """One steering experiment as a DataFrame (feature, strength, costs, effects)."""
        self._check_experiment(sae_id, experiment)
        return self.query(
            f"SELECT {', '.join(STEERING_COLUMNS)} FROM steering WHERE sae_id = ? AND experiment = ?"
            " ORDER BY feature, kind, strength",
            [sae_id, experiment],
        )

    def steering_settings(self, sae_id: str, experiment: str) -> dict[str, Any]:
        """The settings an experiment was saved with (empty for experiments saved without, or before
        user data existed)."""
        self._check_experiment(sae_id, experiment)
        if self.writable:
            return {}  # a writer's connection sees the store file alone
        (text,) = self._rows(
            "SELECT any_value(settings) FROM steering WHERE sae_id = ? AND experiment = ?", [sae_id, experiment]
        )[0]
        return json.loads(text) if text else {}

    def export_parquet(self, out_dir: str | Path) -> list[Path]:
        """Write every table to `out_dir/<table>.parquet`; returns the files written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for table in ("saelab_meta", *(t for t in TABLES if self._has_table(t))):
            dest = out / f"{table}.parquet"
            self.con.execute(f"COPY (SELECT * FROM {table}) TO {sql_literal(dest)} (FORMAT PARQUET)").fetchall()
            written.append(dest)
        return written
