"""The feature store's schema: every table's SQL, the migrations between versions, what may be sorted.

This is the one place the tables are defined; `saelab.store.records` names the columns each read
returns, and docs/store.md documents both for users.
"""

from __future__ import annotations

FORMAT = "saelab-feature-store"
SCHEMA_VERSION = 5

SCHEMA = """
CREATE TABLE saelab_meta (key VARCHAR PRIMARY KEY, value VARCHAR);

-- One row per analysed SAE. JSON columns are text (no extension needed to read them).
CREATE TABLE saes (
    sae_id VARCHAR PRIMARY KEY,
    run_dir VARCHAR,
    model VARCHAR,
    hook_name VARCHAR,
    sparsifier VARCHAR,
    d_in INTEGER,
    d_sae INTEGER,
    k INTEGER,
    n_tokens BIGINT,          -- ordinary tokens analysed
    n_outliers BIGINT,        -- tokens skipped: massive norms or non-finite activations (no SAE there)
    n_dead INTEGER,           -- features that never fired on the analysed tokens
    context_size INTEGER,
    cfg VARCHAR,              -- the SAE's cfg.json
    eval VARCHAR,             -- the run's eval.json, NULL if it was never evaluated
    params VARCHAR,           -- the analysis settings
    timings VARCHAR,          -- seconds per analysis phase; model forward reported apart
    density_edges DOUBLE[],   -- log10 firing-density histogram over live features
    density_counts BIGINT[],
    saelab_version VARCHAR,
    created_at TIMESTAMP
);

-- Training curves in long form: one row per (step, metric).
CREATE TABLE train_metrics (sae_id VARCHAR, step BIGINT, metric VARCHAR, value DOUBLE);

CREATE TABLE features (
    sae_id VARCHAR,
    feature INTEGER,
    n_fires BIGINT,
    density DOUBLE,           -- n_fires / n_tokens
    mean_act DOUBLE,          -- mean activation over the tokens where it fires
    max_act DOUBLE,           -- largest |activation| (signed SAEs fire both ways)
    neg_frac DOUBLE,          -- share of firings with a negative activation (0 unless signed)
    q50 DOUBLE,               -- quantiles of |activation| over firings (exact)
    q90 DOUBLE,
    q99 DOUBLE,
    hist_counts INTEGER[],    -- firings per equal-width bin of |activation| over (0, max_act]
    band_counts BIGINT[],     -- firings per sampling band (equal-width bands over (0, max_act])
    pos_token_ids INTEGER[],  -- tokens the decoder direction most promotes (through the unembedding)
    pos_tokens VARCHAR[],
    pos_logits REAL[],
    neg_token_ids INTEGER[],  -- ... and most suppresses
    neg_tokens VARCHAR[],
    neg_logits REAL[],
    neighbours INTEGER[],     -- nearest features by decoder cosine similarity
    neighbour_cos REAL[],
    label VARCHAR,
    PRIMARY KEY (sae_id, feature)
);

-- Top-activating examples (kind 'top', rank 0 = strongest) and samples from each activation band
-- (kind 'band'), each a window of tokens around the example's token with this feature's activation
-- at every token of the window.
CREATE TABLE examples (
    sae_id VARCHAR,
    feature INTEGER,
    kind VARCHAR,
    band SMALLINT,            -- band index for kind 'band', -1 for 'top'
    rank SMALLINT,
    act REAL,                 -- activation at the example's token (signed)
    seq INTEGER,              -- held-out sequence index
    pos INTEGER,              -- position of the example's token in the sequence
    start INTEGER,            -- position of the window's first token
    max_token VARCHAR,        -- the example's token, as text
    token_ids INTEGER[],
    acts REAL[]
);

-- Token id -> text, once per model.
CREATE TABLE vocab (model VARCHAR, token_id INTEGER, token VARCHAR, PRIMARY KEY (model, token_id));
"""

STEERING_TABLE = """
-- Steering sweeps (schema v2): one row per (experiment, feature, strength), from saelab.steering.sweep.
CREATE TABLE steering (
    sae_id VARCHAR,
    experiment VARCHAR,
    feature INTEGER,
    kind VARCHAR,             -- 'add' or 'clamp'
    units VARCHAR,            -- 'raw' or 'max' (multiples of the feature's max activation)
    strength DOUBLE,
    ce_loss DOUBLE,           -- CE on held-out text with the intervention
    ce_clean DOUBLE,
    ce_increase DOUBLE,
    kl DOUBLE,                -- KL(clean || steered) per predicted token
    target_logprob DOUBLE,    -- mean log P(next token is one of `targets`) with the intervention
    target_logprob_clean DOUBLE,
    delta_logprob DOUBLE,
    targets VARCHAR,          -- the target tokens, '|'-separated
    created_at TIMESTAMP
);
"""
DIFFING_TABLE = """
-- Crosscoders (schema v3): each latent's decoder norm per source and, for two sources, the
-- model-diffing view (saelab.diffing): relative norm ||d_B|| / (||d_A|| + ||d_B||), the cosine
-- between the two decoder directions, and the class it implies ('A-only', 'shared', 'B-only').
CREATE TABLE diffing (
    sae_id VARCHAR,
    feature INTEGER,
    source_norms DOUBLE[],
    rel_norm DOUBLE,
    dec_cos DOUBLE,
    diff_class VARCHAR,
    PRIMARY KEY (sae_id, feature)
);
"""
DIFFING_SCALING = """
-- Schema v4: Latent Scaling ratios of two-source crosscoders (saelab.diffing.ScalingRatios):
-- beta(other source) / beta(owning source) fitted to reconstruction errors (complete shrinkage when
-- large) and to reconstructions by the other latents (latent decoupling when large).
ALTER TABLE diffing ADD COLUMN nu_error DOUBLE;
ALTER TABLE diffing ADD COLUMN nu_recon DOUBLE;
"""
CONTEXT_MAX = """
-- Schema v5: the largest |activation| among a feature's firings on tokens with at least the analysis's
-- min_context tokens before them in their sequence (NULL if none, and for SAEs analysed before v5):
-- the strongest firing with context, which max_act is not for features that fire hardest on a sequence's first tokens.
ALTER TABLE features ADD COLUMN ctx_max_act DOUBLE;
-- ... and each example's token id, so text search matches ids instead of scanning every token text.
ALTER TABLE examples ADD COLUMN max_token_id INTEGER;
UPDATE examples SET max_token_id = token_ids[pos - start + 1];
"""
SCHEMA += STEERING_TABLE + DIFFING_TABLE + DIFFING_SCALING + CONTEXT_MAX

MIGRATIONS = {1: STEERING_TABLE, 2: DIFFING_TABLE, 3: DIFFING_SCALING, 4: CONTEXT_MAX}
"""SQL that takes a store from schema version v to v + 1 (applied by writers, in a copy)."""

ADDED_COLUMNS = {
    4: {"diffing": {"nu_error": "DOUBLE", "nu_recon": "DOUBLE"}},
    5: {"features": {"ctx_max_act": "DOUBLE"}, "examples": {"max_token_id": "INTEGER"}},
}
"""Columns that schema version v added to existing tables (table -> column -> type). A reader of an
older store sees them as NULL (`saelab.store.connection`), since readers do not migrate, or as
their `DERIVED_COLUMNS` expression where the old rows determine them."""

DERIVED_COLUMNS = {"max_token_id": "token_ids[pos - start + 1]"}
"""Added columns that older rows already determine: how a reader (and the migration) computes them."""

TABLES = ("saes", "train_metrics", "features", "examples", "vocab", "steering", "diffing")
PER_SAE_TABLES = ("saes", "train_metrics", "features", "examples", "diffing")

SORT_KEYS = ("feature", "n_fires", "density", "mean_act", "max_act", "ctx_max_act", "neg_frac", "q50", "q90", "q99")
"""Columns the feature list can be sorted by (a whitelist: ORDER BY cannot take a parameter)."""

JSON_COLUMNS = ("cfg", "eval", "params", "timings")
"""Columns of `saes` holding JSON text (decoded on read, encoded on write)."""
