"""saelab.prompt: an SAE's features at each token of one prompt, against a dense encode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from saelab.errors import DataError
from saelab.prompt import run_prompt
from saelab.rundir import RunDir
from saelab.store import FeatureStore

PROMPT = "Now is the winter of our discontent made glorious summer by this sun of York."


@pytest.fixture(scope="module")
def run(app_store):
    with FeatureStore(app_store) as fs:
        return RunDir(fs.sae("sae").run_dir).load()


def test_features_per_token_match_a_dense_encode(run) -> None:
    got = run_prompt(run.sae, run.sources, PROMPT)
    model, hook = run.sources[0]
    (ids,) = model.tokenize([PROMPT])
    assert got.token_ids == ids and all(got.kept)
    with torch.no_grad():
        dense = run.sae.encode(model.activations(torch.tensor([ids]), hook)[0].float()).numpy()
    for t in range(len(ids)):
        active = got.active(t)
        assert {f for f, _ in active} == set(np.flatnonzero(dense[t]))
        assert [abs(v) for _, v in active] == sorted((abs(v) for _, v in active), reverse=True)
    f = int(np.abs(dense).max(axis=0).argmax())
    np.testing.assert_allclose(got.feature(f), dense[:, f], rtol=1e-5, atol=1e-6)


def test_skipped_tokens_get_no_features(run) -> None:
    sae = run.sae
    original = sae.cfg
    sae.cfg = dataclasses.replace(original, exclude_norm_above=1e-6)  # every token is "massive"
    try:
        got = run_prompt(sae, run.sources, PROMPT)
    finally:
        sae.cfg = original
    assert not any(got.kept) and (got.indices == -1).all() and got.active(0) == []
    with pytest.raises(DataError, match="out of range"):
        got.active(len(got.token_ids))


def test_a_crosscoder_latent_is_split_by_source(app_store) -> None:
    with FeatureStore(app_store) as fs:
        cc = RunDir(fs.sae("cc").run_dir).load()
    got = run_prompt(cc.sae, cc.sources, PROMPT)
    assert got.source_parts is not None and got.source_parts.shape == (*got.indices.shape, 2)
    (ids,) = cc.sources[0][0].tokenize([PROMPT])
    acts = torch.stack([m.activations(torch.tensor([ids]), h)[0].float() for m, h in cc.sources], dim=1)
    with torch.no_grad():
        pre = cc.sae.pre_acts(acts).numpy()
    t, j = np.argwhere(got.indices >= 0)[0]
    f = got.indices[t, j]
    # The two sources' parts and the bias make up the latent's pre-activation.
    np.testing.assert_allclose(
        got.source_parts[t, j].sum() + float(cc.sae.b_enc.detach()[f]), pre[t, f], rtol=1e-4, atol=1e-5
    )
    parts = got.feature_parts(int(f))
    assert parts.shape == (len(ids), 2) and np.all(parts[got.feature(int(f)) == 0] == 0)
