"""Transcoders and skip transcoders: read one hook point, predict another, and are spliced in there."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from saelab import SAE, SAEConfig, TrainConfig
from saelab.activations import ActivationCache
from saelab.config import DataConfig
from saelab.corpus import token_sequences
from saelab.errors import ConfigError, DataError
from saelab.evals import reconstruction_metrics, spliced_metrics
from saelab.trainer import Trainer

MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def transcoder(d_in: int = 6, d_out: int = 4, skip: bool = False, **kw) -> SAE:
    names = {"hook_name": "in", "hook_name_out": "out"}
    return SAE(SAEConfig(d_in=d_in, d_sae=16, k=3, d_out=d_out, skip_connection=skip, **names, **kw))


def test_a_transcoder_maps_its_input_space_to_its_output_space() -> None:
    torch.manual_seed(0)
    tc = transcoder(skip=True)
    with torch.no_grad():
        tc.W_skip.normal_()
    x, y = torch.randn(10, 6), torch.randn(10, 4)
    out = tc(x, target=y)
    tc.eval()
    assert out.recon.shape == (10, 4) and tc.decoder_directions().shape == (16, 4)
    assert torch.allclose(out.recon, tc.reconstruct(x), atol=1e-5)
    assert torch.allclose(tc.reconstruct(x), tc.decode(tc.encode(x)) + x @ tc.W_skip, atol=1e-5)
    assert float(out.mse) == pytest.approx(float((tc.reconstruct(x).detach() - y).pow(2).sum(-1).mean()), rel=1e-5)
    rows = torch.cat([x, y], dim=1)
    inputs, extra = tc.split_rows(rows)
    assert torch.equal(inputs, x) and torch.equal(extra["target"], y)


def test_transcoder_input_errors_are_clear() -> None:
    from saelab.steering import Ablate

    tc = transcoder()
    with pytest.raises(DataError, match="target="):
        tc(torch.randn(3, 6))
    with pytest.raises(DataError, match="width d_out = 4"):
        tc(torch.randn(3, 6), target=torch.randn(3, 6))
    with pytest.raises(DataError, match="width 7"):
        tc.split_rows(torch.randn(3, 7))
    with pytest.raises(DataError, match="targets"):
        reconstruction_metrics(tc, torch.randn(3, 6))
    with pytest.raises(DataError, match="inputs="):
        Ablate(tc, [0]).apply(torch.randn(3, 4))
    with pytest.raises(ConfigError, match="transcoder"):
        SAEConfig(d_in=4, skip_connection=True)
    with pytest.raises(ConfigError, match="topafa"):
        transcoder(sparsifier="topafa")
    with pytest.raises(ConfigError, match="hook_name_out"):
        DataConfig(hook_name_out="blocks.1.hook_mlp_out", cross_sources="blocks.2.hook_resid_post")
    with pytest.raises(ConfigError, match="hook_name_out"):
        TrainConfig(sae=SAEConfig(skip_connection=True))


def test_a_transcoder_saves_and_loads_in_its_own_layout(tmp_path) -> None:
    torch.manual_seed(0)
    tc = transcoder(skip=True)
    with torch.no_grad():
        tc.W_skip.normal_()
        tc.out_scale.fill_(0.5)
    tc.save(tmp_path / "tc")  # SAELens has no saelab transcoder layout, so saelab's own is written
    back = SAE.load(tmp_path / "tc")
    x = torch.randn(5, 6)
    assert back.cfg.hook_name_out == "out" and torch.allclose(back.reconstruct(x), tc.eval().reconstruct(x))


def _train(cache: ActivationCache, data: DataConfig, out, skip: int, k: int) -> SAE:
    cfg = TrainConfig(sae=SAEConfig(k=k, expansion_factor=4, skip_connection=bool(skip)), data=data, out_dir=str(out),
                      batch_size=512, epochs=8, lr=3e-3, checkpoint_every=0, eval_tokens=0)  # fmt: skip
    sae_cfg = dataclasses.replace(cfg.sae, d_out=int(cache.meta["d_out"]), hook_name_out=MLP_OUT, hook_name=MLP_IN)
    torch.manual_seed(0)
    return Trainer(cfg, SAE(sae_cfg.resolve(int(cache.meta["d_in"]))), cache.source(0)).fit()


def test_skip_transcoder_splices_in_better_than_a_plain_one_at_equal_l0(
    tiny_model, tiny_model_dir, corpus_dir, tmp_path, record_property
) -> None:
    """Paulo, Shabalin & Belrose 2025: the skip connection lowers the spliced-in loss at the same sparsity."""
    data = DataConfig(model=str(tiny_model_dir), dataset=str(corpus_dir), hook_name=MLP_IN, hook_name_out=MLP_OUT,
                      context_size=32, n_tokens=16384, exclude_norm_factor=0)  # fmt: skip
    cache = ActivationCache.harvest(tiny_model, data, tmp_path / "cache")
    assert cache.meta["d_out"] == 32 and cache.meta["key"]["hook_name_out"] == MLP_OUT
    seqs = token_sequences(tiny_model, data, "eval", 2048)
    plain, skip = (spliced_metrics(_train(cache, data, tmp_path / str(s), s, k=4), tiny_model, seqs) for s in (0, 1))
    record_property("spliced CE plain / skip / clean", (plain.ce_loss_sae, skip.ce_loss_sae, plain.ce_loss_clean))
    assert plain.l0 == skip.l0 == 4
    assert skip.ce_loss_sae < plain.ce_loss_sae and skip.kl_div < plain.kl_div and skip.fvu < plain.fvu
    assert plain.ce_loss_clean == skip.ce_loss_clean  # the same held-out tokens


def test_clamping_a_transcoder_latent_changes_its_output_hook_by_that_latent_alone(
    tiny_model, tiny_model_dir, corpus_dir, tmp_path
) -> None:
    from saelab.steering import Clamp, intervene

    torch.manual_seed(0)
    tc = SAE(SAEConfig(d_in=32, d_sae=64, k=4, d_out=32, hook_name=MLP_IN, hook_name_out=MLP_OUT)).eval()
    toks = torch.randint(3, 300, (2, 9))
    acts = tiny_model.activations_at(toks, [MLP_IN, MLP_OUT])
    x, y = acts[MLP_IN].reshape(-1, 32), acts[MLP_OUT].reshape(-1, 32)
    a = tc.encode(x)
    expected = y + (5.0 - a[:, [7]]) * tc.decoder_directions()[7]
    assert torch.allclose(Clamp(tc, 7, 5.0).apply(y, inputs=x), expected, atol=1e-5)
    with intervene(tiny_model, [Clamp(tc, 7, 5.0)]):  # read at the input hook, written at the output hook
        steered = tiny_model.activations(toks, MLP_OUT).reshape(-1, 32)
    assert torch.allclose(steered, expected, atol=1e-4)


def test_the_store_names_a_transcoders_kind_and_both_hooks() -> None:
    from saelab.store.records import SAEInfo

    blank = {f.name: None for f in dataclasses.fields(SAEInfo)}
    cfg = {"hook_name_out": MLP_OUT, "skip_connection": True}
    info = SAEInfo(**blank | {"hook_name": MLP_IN, "sparsifier": "topk", "cfg": cfg})
    assert info.kind == "topk (skip transcoder)" and info.hook_label == f"{MLP_IN} → {MLP_OUT}"
    plain = SAEInfo(**blank | {"hook_name": MLP_IN, "sparsifier": "jumprelu", "cfg": {"hook_name_out": ""}})
    assert plain.kind == "jumprelu" and plain.hook_label == MLP_IN


def test_a_transcoder_whose_output_hook_fires_first_is_refused(
    tiny_model, tiny_model_dir, corpus_dir, tmp_path
) -> None:
    assert tiny_model.hook_order([MLP_OUT, "blocks.1.hook_resid_post", MLP_IN]) == [
        MLP_IN,
        MLP_OUT,
        "blocks.1.hook_resid_post",
    ]
    data = DataConfig(model=str(tiny_model_dir), dataset=str(corpus_dir), hook_name=MLP_OUT, hook_name_out=MLP_IN,
                      context_size=32, n_tokens=256)  # fmt: skip
    with pytest.raises(DataError, match=r"swap data\.hook_name"):
        ActivationCache.harvest(tiny_model, data, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
