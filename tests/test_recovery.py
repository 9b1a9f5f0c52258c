"""Every variant, trained by the Trainer on data from a known sparse dictionary, recovers it."""

from __future__ import annotations

import pytest
import torch
from synthetic import mean_max_cosine, sparse_dictionary_data

from saelab import SAE, SAEConfig, TrainConfig
from saelab.activations import ArrayActivations
from saelab.trainer import Trainer

D_IN, N_FEATURES = 32, 48
# Per variant: (extra SAE config, minimum mean max cosine similarity to the true directions).
CASES = {
    "topk": ({}, 0.95),
    "batchtopk": ({}, 0.95),
    "abstopk": ({}, 0.95),
    "mutualchoice": ({}, 0.95),
    "featurechoice": ({}, 0.90),
    "relu": ({"l1_coeff": 0.3}, 0.90),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_recovers_true_dictionary(name: str, tmp_path, record_property) -> None:
    extra, floor = CASES[name]
    signed = name == "abstopk"  # bidirectional features: one signed latent per true direction
    x, D = sparse_dictionary_data(24_000, D_IN, N_FEATURES, p_active=3 / N_FEATURES, signed=signed)
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        batch_size=512,
        epochs=6,
        lr=3e-3,
        warmup_steps=20,
        checkpoint_every=0,
        dead_after_tokens=20_000,
        geometric_median_samples=512,
    )
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=2 * N_FEATURES, sparsifier=name, k=4, **extra))
    Trainer(cfg, sae, ArrayActivations(x, seed=0)).fit()
    score = mean_max_cosine(sae.W_dec.detach(), D, signed=signed)
    record_property("mean_max_cosine", score)
    print(f"{name}: mean max cosine similarity {score:.3f}")
    assert score >= floor
