"""Loading other libraries' SAEs (saelab.formats): against the real libraries where they install
(sparsify here; SAELens in the TransformerLens 3.x environment of `make test-tl3`), the encodings
compared on random inputs; Gemma Scope from its published file layout; and every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab import SAE
from saelab.errors import CheckpointError
from saelab.models import tl_major

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU


def _dense(acts: torch.Tensor, idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(acts.shape[0], d_sae).scatter(1, idx, acts)


def _sparse(dense: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k largest entries, as sparsify's decode takes them."""
    return dense.topk(k, dim=1)


def same_codes(ours: SAE, encode: Callable, decode: Callable | None, x: torch.Tensor, tol: float = 1e-4) -> None:
    """`ours` fires the same latents with the same values on x as another library's `encode` (and, with
    `decode`, reconstructs the same from them)."""
    with torch.no_grad():
        want, got = encode(x), ours.encode(x)
        assert torch.equal(got != 0, want != 0)  # the same latents fire
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        if decode is not None:
            torch.testing.assert_close(ours.decode(got), decode(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_a_sparsify_sae_loads_and_encodes_the_same(tmp_path, multi_topk) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(16, SparseCoderConfig(num_latents=64, k=5, multi_topk=multi_topk))  # multi_topk: training only
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(0, 0.3)
    coder.save_to_disk(tmp_path / "layers.3")
    sae = SAE.load(tmp_path / "layers.3")
    assert sae.cfg.sparsifier == "topk" and sae.cfg.k == 5 and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    assert sae.imported_from == "sparsify layers.3"
    theirs = (lambda x: _dense(*coder.encode(x)[:2], 64)), (lambda f: coder.decode(*_sparse(f)))
    same_codes(sae, *theirs, torch.randn(200, 16))
    # A folder of several hook points names them; a truncated weights file says so.
    with pytest.raises(CheckpointError, match=r"several SAEs \(layers.3\)"):
        SAE.load(tmp_path)
    weights = tmp_path / "layers.3" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SAE.load(tmp_path / "layers.3")


@pytest.mark.parametrize(("key", "value", "message"), [("activation", "groupmax", "group-max"),
                                                       ("skip_connection", True, "skip connection"),
                                                       ("transcode", True, "transcode")])  # fmt: skip
def test_sparsify_features_saelab_cannot_represent_are_refused(tmp_path, key, value, message) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(8, SparseCoderConfig(num_latents=16, k=2)).save_to_disk(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text()) | {key: value}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        SAE.load(tmp_path)


def _gemma_scope(path: Path, d_in: int = 12, d_sae: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """A params.npz laid out as Gemma Scope publishes it (google/gemma-scope-*: layer_L/width_W/average_l0_N)."""
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": rng.uniform(0, 2, size=d_sae).astype(np.float32),
    }
    path.mkdir(parents=True)
    np.savez(path / "params.npz", **params)
    return params


def test_a_gemma_scope_sae_loads_as_its_jumprelu(tmp_path) -> None:
    where = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_20"
    p = {k: torch.from_numpy(v) for k, v in _gemma_scope(where).items()}
    sae = SAE.load(where)
    assert sae.cfg.sparsifier == "jumprelu" and sae.cfg.hook_name == "blocks.7.hook_resid_post"

    def encode(x: torch.Tensor) -> torch.Tensor:
        pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's encoder does not subtract b_dec
        return (pre > p["threshold"]) * pre.relu()

    same_codes(sae, encode, lambda f: f @ p["W_dec"] + p["b_dec"], torch.randn(300, 12) * 3)
    assert SAE.load(where / "params.npz").cfg.d_sae == 40  # the file itself, too
    (where / "params.npz").write_bytes((where / "params.npz").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SAE.load(where)


def test_saelab_directories_and_unknown_folders_still_load_or_explain(tmp_path) -> None:
    from saelab import SAEConfig

    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    sae.save(tmp_path / "own")
    assert SAE.load(tmp_path / "own").imported_from is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"cfg\.json is missing"):
        SAE.load(tmp_path / "empty")


# SAELens 6 needs TransformerLens 3.x: these run in the environment `make test-tl3` builds.
saelens = pytest.mark.skipif(tl_major() >= 4, reason="SAELens runs beside TransformerLens 3.x (make test-tl3)")


def _saelens_sae(arch: str, tmp_path: Path, **extra):
    import sae_lens

    torch.manual_seed(1)
    kinds = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
    }
    cls, cfg_cls = kinds[arch]
    cfg = cfg_cls(d_in=16, d_sae=48, **extra)
    cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    cfg.metadata.model_name = "tiny"
    sae = cls(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 1.0)
    sae.save_model(tmp_path / arch)
    return sae


@saelens
@pytest.mark.parametrize(
    ("arch", "extra", "ours"),
    [
        ("standard", {}, "relu"),
        ("topk", {"k": 6}, "topk"),
        ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}, "topk"),
        ("abstopk", {"k": 6}, "abstopk"),
        ("jumprelu", {}, "jumprelu"),
        ("gated", {}, "jumprelu"),
        ("standard", {"apply_b_dec_to_input": False}, "relu"),
    ],
)
def test_saelens_saes_load_and_encode_the_same(tmp_path, arch, extra, ours) -> None:
    theirs = _saelens_sae(arch, tmp_path, **extra)
    sae = SAE.load(tmp_path / arch)
    assert sae.cfg.sparsifier == ours and sae.cfg.hook_name == "blocks.2.hook_resid_post"
    same_codes(sae, theirs.encode, theirs.decode, torch.randn(300, 16) * 2)


@saelens
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"normalize_activations": "layer_norm"}, "layer-normalises"),
        ({"normalize_activations": "constant_norm_rescale"}, "per token"),
        ({"architecture": "transcoder"}, "no exact saelab equivalent"),
        ({"normalize_activations": "expected_average_only_in"}, "scaling factor"),
        ({"reshape_activations": "hook_z"}, "attention heads"),
        ({"metadata": {"sae_lens_version": "6.54.12", "hook_head_index": 3}}, "one attention head"),
    ],
)
def test_saelens_features_saelab_cannot_represent_are_refused(tmp_path, change, message) -> None:
    _saelens_sae("standard", tmp_path)
    cfg = json.loads((tmp_path / "standard" / "cfg.json").read_text()) | change
    (tmp_path / "standard" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        SAE.load(tmp_path / "standard")


def test_an_imported_sae_evaluates_analyses_and_opens_in_the_app(
    tiny_model_dir, corpus_dir, tmp_path, monkeypatch
) -> None:
    from sparsify import SparseCoder, SparseCoderConfig
    from streamlit.testing.v1 import AppTest

    from saelab.app import MAIN, STORE_ENV
    from saelab.cli import main
    from saelab.store import FeatureStore

    torch.manual_seed(0)
    coder = SparseCoder(32, SparseCoderConfig(num_latents=64, k=4))  # the tiny model's width
    run = tmp_path / "sparsify-run" / "layers.1"
    coder.save_to_disk(run)
    store = tmp_path / "s.duckdb"
    # sparsify's folder says the hook point (layers.1) but not the model: without --model, a message.
    assert main(["analyze", str(run), "--store", str(store), "--tokens", "256"]) == 2
    source = ["--model", str(tiny_model_dir), "--dataset", str(corpus_dir)]
    assert main(["eval", str(run), "--tokens", "256", *source]) == 0
    assert main(["analyze", str(run), "--store", str(store), "--tokens", "256", "--n_top", "3", *source]) == 0
    with FeatureStore(store) as fs:
        info = fs.sae("layers.1")
        assert info.hook_name == "blocks.1.hook_resid_post" and info.sparsifier == "topk" and info.d_sae == 64
        assert fs.feature_list("layers.1").total == 64 and fs.fired_features("layers.1")
    monkeypatch.setenv(STORE_ENV, str(store))
    at = AppTest.from_file(str(MAIN), default_timeout=60)
    at.query_params.update({"sae": "layers.1", "text": "To be, or not to be"})
    at.run()
    at.switch_page("views/inspect.py")
    at.query_params.update({"sae": "layers.1", "text": "To be, or not to be"})
    at.run()
    assert not at.exception and not at.error and "Features at token" in "".join(s.value for s in at.subheader)
    at.switch_page("views/steer.py")
    at.query_params.update({"sae": "layers.1", "f": "3:40", "units": "raw", "prompt": "To be", "n": "5"})
    at.run()
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception and not at.error and len(at.text) == 2  # steered beside unsteered


# dictionary_learning pulls a second torch (2.14, with CUDA) through nnsight, so these files follow its
# documented layout (dictionary.py, trainers/top_k.py, batch_top_k.py in saprmarks/dictionary_learning)
# and the expected codes its documented forward passes.
def _dl(kind: str, d: int = 12, F: int = 40, seed: int = 0) -> tuple[dict[str, torch.Tensor], object]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    relu = torch.relu
    if kind == "AutoEncoder":
        s = {"bias": r(d), "encoder.weight": r(F, d), "encoder.bias": r(F), "decoder.weight": r(d, F)}
        return s, lambda x: relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if kind == "AutoEncoderNew":
        s = {"encoder.weight": r(F, d), "encoder.bias": r(F), "decoder.weight": r(d, F), "decoder.bias": r(d)}
        return s, lambda x: relu(x @ s["encoder.weight"].T + s["encoder.bias"])
    if kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        s = {"b_dec": r(d), "k": torch.tensor(5, dtype=torch.int32), "threshold": torch.tensor(0.7),
             "decoder.weight": r(d, F), "encoder.weight": r(F, d), "encoder.bias": r(F)}  # fmt: skip

        def topk(x: torch.Tensor) -> torch.Tensor:
            a = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
            if kind == "BatchTopKSAE":
                return a * (a > s["threshold"])
            v, i = a.topk(5, dim=-1)
            return torch.zeros_like(a).scatter(-1, i, v)

        return s, topk
    if kind == "JumpReluAutoEncoder":
        s = {"W_enc": r(d, F), "b_enc": r(F), "W_dec": r(F, d), "b_dec": r(d), "threshold": r(F).abs()}

        def jump(x: torch.Tensor) -> torch.Tensor:
            pre = x @ s["W_enc"] + s["b_enc"]
            return relu(pre * (pre > s["threshold"]))

        return s, jump
    s = {"decoder_bias": r(d), "encoder.weight": r(F, d), "r_mag": r(F) * 0.3, "gate_bias": r(F),
         "mag_bias": r(F), "decoder.weight": r(d, F)}  # fmt: skip

    def gated(x: torch.Tensor) -> torch.Tensor:
        u = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        return (u + s["gate_bias"] > 0) * relu(u * s["r_mag"].exp() + s["mag_bias"])

    return s, gated


@pytest.mark.parametrize(
    "kind",
    ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder"],
)
def test_dictionary_learning_checkpoints_load_and_encode_the_same(tmp_path, kind) -> None:
    state, encode = _dl(kind)
    torch.save(state, tmp_path / "ae.pt")
    trainer = {"dict_class": kind, "activation_dim": 12, "dict_size": 40, "lm_name": "EleutherAI/pythia-70m"}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    sae = SAE.load(tmp_path)
    assert sae.imported_from == f"dictionary_learning {kind}" and sae.cfg.model_name == "EleutherAI/pythia-70m"
    same_codes(sae, encode, None, torch.randn(300, 12) * 2)


def test_dictionary_learning_refuses_what_it_cannot_read(tmp_path) -> None:
    state, _ = _dl("AutoEncoder")
    torch.save(state, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        SAE.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "Mystery"}}))
    with pytest.raises(CheckpointError, match="'Mystery' is not one saelab reads"):
        SAE.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    torch.save({"weights": object()}, tmp_path / "ae.pt")  # a pickled object: never unpickled
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        SAE.load(tmp_path)


def _hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache holding `repo` at one commit, laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for name, data in files.items():
        dest = base / "snapshots" / commit / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def _offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_hub_sae_loads_offline_from_the_hugging_face_cache(tmp_path) -> None:
    folder = tmp_path / "src" / "layer_7" / "width_16k" / "average_l0_20"
    _gemma_scope(folder)
    npz = (folder / "params.npz").read_bytes()
    cache = tmp_path / "hub"
    _hub_cache(cache, "google/gemma-scope-2b-pt-res", {"layer_7/width_16k/average_l0_20/params.npz": npz})
    code = (
        "from saelab import SAE; "
        "s = SAE.load('google/gemma-scope-2b-pt-res', subfolder='layer_7/width_16k/average_l0_20'); "
        "print(s.cfg.sparsifier, s.cfg.d_sae, s.cfg.hook_name)"
    )
    done = _offline(code, cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["jumprelu", "40", "blocks.7.hook_resid_post"]
    missing = _offline("from saelab import SAE; SAE.load('google/gemma-scope-2b-pt-res', subfolder='layer_9')", cache)
    assert missing.returncode != 0 and "has no folder 'layer_9'" in missing.stderr
    absent = _offline("from saelab import SAE; SAE.load('nobody/no-such-saes')", cache)
    assert absent.returncode != 0 and "cannot get nobody/no-such-saes from the Hugging Face hub" in absent.stderr


@saelens
def test_a_saelens_release_name_resolves_through_its_registry_offline(tmp_path) -> None:
    from saelab.formats import release

    repo, folder, model = release("gemma-scope-2b-pt-res-canonical", "layer_7/width_16k/canonical")
    assert repo == "google/gemma-scope-2b-pt-res" and folder.startswith("layer_7/width_16k/average_l0_")
    src = tmp_path / "src"
    _gemma_scope(src)
    cache = tmp_path / "hub"
    _hub_cache(cache, repo, {f"{folder}/params.npz": (src / "params.npz").read_bytes()})
    code = (
        "from saelab.sae import from_release; "
        "s = from_release('gemma-scope-2b-pt-res-canonical', 'layer_7/width_16k/canonical'); "
        "print(s.cfg.model_name, s.cfg.hook_name)"
    )
    done = _offline(code, cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [model, "blocks.7.hook_resid_post"]
    with pytest.raises(CheckpointError, match="no SAELens release 'gemma-scope-2b-pt-rez'"):
        release("gemma-scope-2b-pt-rez", "x")


def _saelab_sae(sparsifier: str, seed: int = 0) -> SAE:
    """A random saelab SAE with a non-trivial input scale, biases and (where it has one) threshold."""
    from saelab import SAEConfig

    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=16, d_sae=48, sparsifier=sparsifier, k=5, hook_name="blocks.2.hook_resid_post",
                        model_name="tiny"))  # fmt: skip
    with torch.no_grad():
        sae.act_scale.fill_(0.37)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        if sparsifier in ("batchtopk", "featurechoice", "matryoshka"):
            sae.sparsifier.threshold.fill_(0.8)
        if sparsifier == "jumprelu":  # one trained here: a threshold per latent
            sae.sparsifier.threshold.uniform_(0.1, 1.5)
    return sae.eval()


@pytest.mark.parametrize("sparsifier", ["topk"])
def test_an_export_to_sparsify_loads_there_with_the_same_codes(tmp_path, sparsifier) -> None:
    from sparsify import SparseCoder

    from saelab.cli import main

    sae = _saelab_sae(sparsifier)
    sae.save(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "sparsify", "--out", str(tmp_path / "layers.2")]) == 0
    theirs = SparseCoder.load_from_disk(tmp_path / "layers.2")
    x = torch.randn(200, 16) * 3
    same_codes(sae, lambda x: _dense(*theirs.encode(x)[:2], 48), None, x)
    same_codes(SAE.load(tmp_path / "layers.2"), sae.encode, sae.decode, x)  # and back


@pytest.mark.parametrize(("sparsifier", "message"), [("batchtopk", "sparsify reads top-k"), ("mutualchoice", None)])
def test_exports_without_an_equivalent_are_refused(tmp_path, sparsifier, message) -> None:
    from saelab.export import export

    with pytest.raises(CheckpointError, match=message or "no SAELens equivalent"):
        export(_saelab_sae(sparsifier), tmp_path / "out", "sparsify" if message else "saelens")


@pytest.mark.parametrize("sparsifier", ["relu", "topk", "abstopk", "batchtopk", "featurechoice", "jumprelu"])
def test_an_export_to_saelens_loads_back_with_the_same_codes(tmp_path, sparsifier) -> None:
    from saelab.export import export

    sae = _saelab_sae(sparsifier)
    export(sae, tmp_path / "sl", "saelens")
    back = SAE.load(tmp_path / "sl")  # read as SAELens files
    assert back.imported_from.startswith("SAELens") and back.cfg.hook_name == "blocks.2.hook_resid_post"
    same_codes(back, sae.encode, sae.decode, torch.randn(300, 16) * 3)


@saelens
@pytest.mark.parametrize("sparsifier", ["relu", "topk", "abstopk", "batchtopk", "jumprelu"])
def test_an_export_to_saelens_loads_in_saelens_with_the_same_codes(tmp_path, sparsifier) -> None:
    import sae_lens

    from saelab.export import export

    sae = _saelab_sae(sparsifier)
    export(sae, tmp_path / "sl", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    same_codes(sae, theirs.encode, theirs.decode, torch.randn(300, 16) * 3)


@saelens
@pytest.mark.parametrize(
    "sparsifier", ["relu", "topk", "abstopk", "batchtopk", "featurechoice", "jumprelu", "matryoshka"]
)
def test_saelabs_own_saved_saes_load_directly_in_saelens(tmp_path, sparsifier) -> None:
    import sae_lens

    sae = _saelab_sae(sparsifier)
    sae.save(tmp_path / "run")  # what `saelab train` writes as a run's final SAE
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "run"))
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post" and theirs.cfg.metadata.model_name == "tiny"
    same_codes(sae, theirs.encode, theirs.decode, torch.randn(300, 16) * 3)
    assert SAE.load(tmp_path / "run").cfg == sae.cfg  # and saelab reads it back as the same SAE


@saelens
def test_an_unfolded_saelens_scaling_factor_becomes_the_input_scale(tmp_path) -> None:
    theirs = _saelens_sae("standard", tmp_path)
    unfolded = {"normalize_activations": "expected_average_only_in"}
    cfg = json.loads((tmp_path / "standard" / "cfg.json").read_text()) | unfolded
    (tmp_path / "standard" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "standard" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    sae = SAE.load(tmp_path / "standard")
    x = torch.randn(200, 16) * 8
    with torch.no_grad():  # SAELens's trainer feeds such an SAE x * s and divides its output by s
        want, got = theirs.encode(x * 0.25), sae.encode(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.decode(got), theirs.decode(want) / 0.25, rtol=1e-4, atol=1e-4)


@saelens
@pytest.mark.parametrize("kind", ["BatchTopK", "MatryoshkaBatchTopK"])
def test_a_saelens_batchtopk_exports_and_checkpoints_load_as_its_jumprelu(tmp_path, kind) -> None:
    import sae_lens

    torch.manual_seed(2)
    extra = {"matryoshka_widths": [16, 48]} if kind == "MatryoshkaBatchTopK" else {}
    cfg = getattr(sae_lens, f"{kind}TrainingSAEConfig")(d_in=16, d_sae=48, k=4, **extra)
    training = getattr(sae_lens, f"{kind}TrainingSAE")(cfg)
    with torch.no_grad():
        for p in training.parameters():
            p.normal_(0, 0.5)
        training.topk_threshold.fill_(0.6)
    training.save_model(tmp_path / "checkpoint")  # a training checkpoint: batchtopk, its scalar threshold
    training.save_inference_model(tmp_path / "export")  # what SAELens exports: a jumprelu
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "export"))
    for where in ("export", "checkpoint"):
        same_codes(SAE.load(tmp_path / where), inference.encode, inference.decode, torch.randn(300, 16) * 2)
