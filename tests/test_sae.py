"""SAE interface, save/load, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from saelab import SAE, CheckpointError, ConfigError, SAEConfig, SparseCode
from saelab.config import SPARSIFIER_NAMES, TrainConfig, apply_overrides, field_docs, load_config


def test_shapes_naming_and_encode_decode_agree() -> None:
    sae = SAE(SAEConfig(d_in=6, d_sae=24, sparsifier="topk", k=3))
    assert sae.W_enc.shape == (6, 24) and sae.W_dec.shape == (24, 6)
    assert sae.b_enc.shape == (24,) and sae.b_dec.shape == (6,)
    x = torch.randn(2, 5, 6)  # leading dims are kept
    out = sae(x)
    assert out.recon.shape == x.shape and out.l0.item() == 3
    acts = sae.encode(x)
    code = sae.encode_sparse(x)
    assert acts.shape == (2, 5, 24) and isinstance(code, SparseCode) and code.values.shape == (10, 3)
    torch.testing.assert_close(sae.decode(acts), out.recon)
    torch.testing.assert_close(sae.decode(code).view_as(x), out.recon)


def test_act_scale_is_transparent_to_callers() -> None:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=4, d_sae=8, sparsifier="topk", k=2))
    x = torch.randn(3, 4)
    before = sae(x).recon
    # Scaling inputs by s and act_scale by 1/s leaves the normalised input, and the output, unchanged
    # relative to the input scale.
    sae.act_scale.fill_(0.5)
    torch.testing.assert_close(sae(2 * x).recon, 2 * before)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("name", ["topk", "batchtopk", "mutualchoice", "relu"])
def test_save_load_round_trip(tmp_path, name, portable) -> None:
    from saelab.sae import SAELENS_ARCHITECTURES

    sae = SAE(SAEConfig(d_in=5, d_sae=20, sparsifier=name, k=2, hook_name="blocks.0.hook_resid_post"))
    sae.train()
    sae(torch.randn(16, 5))  # moves batch-level buffers (threshold, firing rate) off their init
    sae.act_scale.fill_(0.3)
    sae.save(tmp_path, portable=portable)
    assert (tmp_path / "cfg.json").is_file() and (tmp_path / "sae_weights.safetensors").is_file()
    loaded = SAE.load(tmp_path)
    assert loaded.cfg == sae.cfg and not loaded.training  # inference must not move its buffers
    architecture = json.loads((tmp_path / "cfg.json").read_text())["architecture"]
    if not portable or name not in SAELENS_ARCHITECTURES:  # every parameter and buffer as it was
        for key, value in sae.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
        assert architecture == name
        return
    # SAELens's layout: the scale folded into the weights, the same SAE.
    assert architecture == SAELENS_ARCHITECTURES[name] and float(loaded.act_scale) == 1.0
    x = torch.randn(200, 5) * 3
    with torch.no_grad():
        sae.eval()
        assert torch.equal(loaded.encode(x) != 0, sae.encode(x) != 0)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    if name == "batchtopk":
        assert torch.equal(loaded.sparsifier.threshold, sae.sparsifier.threshold)  # exactly, through the JumpReLU


def test_unknown_sparsifier_and_k_above_d_sae() -> None:
    with pytest.raises(ConfigError, match="unknown sparsifier 'topkk'"):
        SAEConfig(d_in=4, d_sae=8, sparsifier="topkk")
    with pytest.raises(ConfigError, match="k = 9 exceeds d_sae = 8"):
        SAEConfig(d_in=4, d_sae=8, k=9)
    with pytest.raises(ConfigError, match="k = 33 exceeds d_sae = 32"):
        SAEConfig(k=33, expansion_factor=8).resolve(4)


def test_configs_know_exactly_the_registered_sparsifiers() -> None:
    from saelab.config import K_FREE_SPARSIFIERS, SIGNED_SPARSIFIERS, SPARSIFIER_NAMES
    from saelab.sparsifiers import SPARSIFIERS

    assert sorted(SPARSIFIERS) == sorted(SPARSIFIER_NAMES)
    assert {name for name, cls in SPARSIFIERS.items() if not cls.uses_k} == K_FREE_SPARSIFIERS
    assert {name for name, cls in SPARSIFIERS.items() if cls.signed} == SIGNED_SPARSIFIERS


def test_input_width_mismatch() -> None:
    sae = SAE(SAEConfig(d_in=4, d_sae=8, k=2, hook_name="blocks.3.hook_resid_post"))
    with pytest.raises(ValueError, match=r"d_in = 4 \(hook blocks.3.hook_resid_post\), got shape \(2, 5\)"):
        sae(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="SAE d_in = 4 but the activations have width 576"):
        SAEConfig(d_in=4).resolve(576)


def test_corrupt_and_truncated_checkpoints(tmp_path) -> None:
    sae = SAE(SAEConfig(d_in=4, d_sae=8, k=2))
    sae.save(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SAE.load(tmp_path)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SAE.load(tmp_path)
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 16}))
    with pytest.raises(CheckpointError, match="has shape"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        SAE.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"no SAE at .*nowhere: no such file or directory"):
        SAE.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"cfg\.json is missing"):
        SAE.load(tmp_path / "empty")


def test_config_files_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('lr = 0.001\n[sae]\nsparsifier = "abstopk"\nk = 16\n')
    cfg = load_config(path)
    assert cfg.sae.sparsifier == "abstopk" and cfg.sae.k == 16 and cfg.lr == 0.001
    cfg = apply_overrides(cfg, {"sae.k": "8", "autocast": "false", "data.hook_name": "blocks.3.hook_resid_post"})
    assert cfg.sae.k == 8 and cfg.autocast is False and cfg.data.hook_name == "blocks.3.hook_resid_post"
    path.write_text("[sae]\nsparsity = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['sae.sparsity'\]"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key --sae.kk"):
        apply_overrides(TrainConfig(), {"sae.kk": "3"})
    with pytest.raises(ConfigError, match=r"--sae.k expects int"):
        apply_overrides(TrainConfig(), {"sae.k": "many"})
    with pytest.raises(ConfigError, match="unknown sparsifier"):
        apply_overrides(TrainConfig(), {"sae.sparsifier": "gated"})


def test_every_config_field_is_documented() -> None:
    import dataclasses

    from saelab.config import DataConfig

    for cls in (SAEConfig, DataConfig, TrainConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_shipped_configs_load() -> None:
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("data/configs/*.toml"))
    names = {load_config(p).sae.sparsifier for p in configs}
    assert names == set(SPARSIFIER_NAMES)


def test_decoder_constraint_keeps_rows_on_the_unit_sphere() -> None:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=13, d_sae=37, sparsifier="topk", k=4))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(37, 1) + 0.5)  # rows off the sphere: the projection must not assume unit norm
    grad = torch.randn(37, 13)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_decoder_grad()
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.grad, grad - (grad * unit).sum(1, keepdim=True) * unit)
    assert (sae.W_dec.grad * unit).sum(1).abs().max() < 1e-5
    sae.set_decoder_norm_to_unit()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(37))
