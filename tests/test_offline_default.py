"""Integration: the real offline default (SmolLM2-135M over Shakespeare), with small token counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_train_and_eval_smollm2_on_shakespeare(tmp_path) -> None:
    from saelab.models import load_model

    model = load_model("smollm2-135m", device="cpu")
    assert (model.d_model, model.n_layers) == (576, 30)
    model.check_hook("blocks.12.hook_resid_post")

    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "data/configs/topk.toml",
        "--out_dir",
        str(out),
        "--data.cache_dir",
        "",
        "--data.n_tokens",
        "8192",
        "--data.model_batch_size",
        "16",
        "--batch_size",
        "1024",
        "--epochs",
        "2",
        "--eval_tokens",
        "512",
    ]
    done = subprocess.run([sys.executable, "-m", "saelab.cli", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "activations" / "meta.json").read_text())
    assert meta["n_tokens"] == 8192 and meta["d_in"] == 576
    # Position 0 of every 128-token sequence is an attention sink with a massive norm: about 1 in 128
    # tokens is excluded, and every sequence contributes at least one.
    assert meta["tokens_excluded"] >= meta["tokens_seen"] // 128
    ev = subprocess.run(
        [sys.executable, "-m", "saelab.cli", "eval", str(out), "--json", "--tokens", "512"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout)
    assert result["l0"] == pytest.approx(32.0)
    assert result["ce_loss_clean"] < result["ce_loss_sae"] < result["ce_loss_zero_ablation"]
    assert 0.0 < result["fvu"] < 1.0

    from saelab.store import FeatureStore

    store = tmp_path / "features.duckdb"
    an = subprocess.run(
        [sys.executable, "-m", "saelab.cli", "analyze", str(out), "--tokens", "1024", "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert an.returncode == 0, an.stderr[-3000:]
    with FeatureStore(store) as fs:
        info = fs.sae("run")
        assert (info.d_sae, info.n_tokens + info.n_outliers) == (4608, 1024)
        top = fs.feature_list("run", sort="ctx_max_act", limit=1).rows[0]
        dash = fs.dashboard("run", top.feature)
        assert dash.top_examples[0].act == pytest.approx(top.ctx_max_act) and top.ctx_max_act <= top.max_act
        assert dash.top_examples[0].pos >= info.params["min_context"]
        assert len(dash.promoted) == 10 and all(isinstance(t, str) for t, _ in dash.promoted)
        assert " the" in fs.vocab("smollm2-135m")


def test_log_probs_match_transformers() -> None:
    """Whichever TransformerLens major is installed, the model computes what transformers computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from saelab.models import load_model, offline_default_dir

    model = load_model("smollm2-135m", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(offline_default_dir())
    # The converted weights are plain fp32: nothing marks them as GGUF-quantized (fine-tunes can be saved).
    assert getattr(hf.config, "quantization_config", None) is None
    toks = torch.tensor([model.tokenize(["Now is the winter of our discontent made glorious summer."])[0]])
    with torch.no_grad():
        ours = model.run_with_hooks(toks).log_softmax(-1)
        theirs = hf(toks).logits.log_softmax(-1)
    assert (ours - theirs).abs().max().item() < 1e-3
    # Logit effects of a direction: the final RMSNorm's gain, then the unembedding.
    d = torch.randn(3, 576)
    with torch.no_grad():
        want = (d * hf.model.norm.weight) @ hf.get_output_embeddings().weight.T
    assert torch.allclose(model.direction_logits(d), want, atol=1e-3, rtol=1e-4)
