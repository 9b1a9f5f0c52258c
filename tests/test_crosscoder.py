"""Crosscoders: shapes, save/load, source checks, Latent Scaling, and planted-feature diffing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab import SAE, SAEConfig, TrainConfig
from saelab.activations import ArrayActivations, source_activations
from saelab.config import ConfigError
from saelab.diffing import CLASSES, ScalingRatios, classify, decoder_cosines, latent_scaling, relative_norms
from saelab.sae import CrossCoder, SparseCode
from saelab.trainer import Trainer


def test_shapes_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    cc = CrossCoder(SAEConfig(d_in=8, d_sae=24, n_sources=2, sparsifier="batchtopk", k=3))
    x = torch.randn(50, 2, 8)
    cc.initialise(x, 32)
    cc.eval()
    out = cc(x)
    assert out.recon.shape == (50, 2, 8) and cc.decode(cc.encode(x)).shape == (50, 2, 8)
    assert cc.encode(x.reshape(50, 16)).shape == (50, 24)  # concatenated input works too
    # Each source is scaled to mean norm sqrt(d_in) on its own.
    scaled = (x * cc.act_scale.view(2, 8)).norm(dim=2).mean(0)
    torch.testing.assert_close(scaled, torch.full((2,), 8**0.5))
    cc.save(tmp_path / "cc")
    back = SAE.load(tmp_path / "cc")  # the saved config says crosscoder, so SAE.load builds one
    assert isinstance(back, CrossCoder) and back.n_sources == 2
    back.eval()
    torch.testing.assert_close(back(x).recon, out.recon)
    with pytest.raises(ConfigError, match="describes a crosscoder"):
        SAE(SAEConfig(d_in=8, d_sae=24, n_sources=2, k=3))
    with pytest.raises(ValueError, match=r"n_sources = 2, d_in = 8"):
        cc.encode(torch.randn(5, 2, 7))


def test_l1_weights_by_summed_source_norms() -> None:
    cc = CrossCoder(SAEConfig(d_in=2, d_sae=2, n_sources=2, sparsifier="relu"))
    with torch.no_grad():
        cc.W_dec.copy_(torch.tensor([[3.0, 4.0, 0.0, 1.0], [0.0, 0.0, 0.6, 0.8]]))
    # Latent 0 writes norm 5 to source A and 1 to B: weight 6 (the SAE would use sqrt(26)); latent 1: 0 + 1.
    torch.testing.assert_close(cc.decoder_norms(), torch.tensor([6.0, 1.0]))


def test_source_activations_check_width_and_tokenizer(tiny_model, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saelab.models import load_model

    toks = torch.tensor([tiny_model.tokenize(["To be, or not to be"])[0]])
    hooks = [(tiny_model, "blocks.0.hook_resid_post"), (tiny_model, "blocks.1.hook_resid_post")]
    acts = source_activations(hooks, toks)
    assert acts.shape == (1, toks.shape[1], 2, 32)
    torch.testing.assert_close(acts[..., 1, :], tiny_model.activations(toks, "blocks.1.hook_resid_post"))
    # A model of another width (same tokenizer) cannot share a crosscoder with the tiny one.
    wide_dir = tmp_path / "wide"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(wide_dir)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    LlamaForCausalLM(cfg).save_pretrained(wide_dir)
    wide = load_model(str(wide_dir), device="cpu")
    with pytest.raises(ValueError, match=r"different widths.*32.*48"):
        source_activations([(tiny_model, "blocks.1.hook_resid_post"), (wide, "blocks.1.hook_resid_post")], toks)
    # A model with another tokenizer would see different tokens for the same ids.
    other_dir = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other_dir)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.vocab_size = len(tok)
    LlamaForCausalLM(cfg).save_pretrained(other_dir)
    other = load_model(str(other_dir), device="cpu")
    with pytest.raises(ValueError, match="tokenizers differ"):
        source_activations([(tiny_model, "blocks.1.hook_resid_post"), (other, "blocks.1.hook_resid_post")], toks)


def test_latent_scaling_matches_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, d_sae = 40, 6, 5
    acts = torch.rand(n, d_sae, generator=g) * (torch.rand(n, d_sae, generator=g) < 0.5)
    acts[:, 4] = 0  # a latent that never fires has no scale
    dirs = torch.randn(d_sae, d, generator=g)
    y = torch.randn(n, d, generator=g)
    betas = latent_scaling(acts, dirs, y)
    for j in range(4):
        # min_beta || beta * f_j d_j^T - Y ||_F^2 as an ordinary least-squares problem in one unknown.
        A = (acts[:, j, None].double() * dirs[j].double()).reshape(-1, 1)
        want = torch.linalg.lstsq(A, y.reshape(-1, 1).double()).solution.item()
        assert betas[j].item() == pytest.approx(want, rel=1e-9)
    assert torch.isnan(betas[4])
    # The sparse form (k = 4 slots per token, zero-padded where fewer fire) gives the same fit.
    values, indices = acts.topk(4, dim=1)
    torch.testing.assert_close(latent_scaling(SparseCode(values, indices), dirs, y), betas, equal_nan=True)
    with pytest.raises(ValueError, match="do not match"):
        latent_scaling(SparseCode(values[1:], indices[1:]), dirs, y)


def test_scaling_ratios_flag_shrinkage_and_decoupling() -> None:
    # Latents 0-2 are written by source B's decoder only (B-only by norm), along unit axes u_j; latent
    # 3 is A-only along u_2 and fires with latent 2. Source A holds nothing of u_0 (truly B-only), half
    # of f_1 u_1 left in its error (complete shrinkage), and f_2 u_2 rebuilt by latent 3 (decoupling).
    g = torch.Generator().manual_seed(0)
    n, d = 500, 6
    u = torch.eye(d)
    dec = torch.zeros(4, 2, d)
    dec[:3, 1] = u[:3]
    dec[3, 0] = u[2]
    f = torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) < 0.4)
    acts = torch.cat([f, f[:, 2:]], dim=1)
    x_b = f @ u[:3]
    x_a = 0.5 * f[:, 1:2] * u[1] + f[:, 2:] * u[2]
    x = torch.stack([x_a, x_b], dim=1)
    recon = torch.stack([f[:, 2:] * u[2], x_b], dim=1)
    whole = ScalingRatios(dec)
    whole.update(x, recon, acts)
    nu = whole.ratios()
    torch.testing.assert_close(nu["nu_error"], torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(nu["nu_recon"], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    # Streaming: sums of two halves, carried through sums()/add_sums(), give the same ratios.
    halves = ScalingRatios(dec)
    for part in torch.arange(n).chunk(2):
        one = ScalingRatios(dec)
        one.update(x[part], recon[part], acts[part])
        halves.add_sums(one.sums())
    for key, value in halves.ratios().items():
        torch.testing.assert_close(value, nu[key])
    with pytest.raises(ValueError, match=r"\[d_sae, 2, d\]"):
        ScalingRatios(torch.zeros(4, 3, d))


def planted_pair(n: int, d: int, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two sources from one sparse code: shared features write to both, A-only / B-only to one."""
    g = torch.Generator().manual_seed(seed)
    n_feat = 3 * per_class
    labels = [CLASSES[1]] * per_class + [CLASSES[0]] * per_class + [CLASSES[2]] * per_class
    dirs = torch.randn(n_feat, 2, d, generator=g)
    dirs /= dirs.norm(dim=2, keepdim=True)
    dirs[per_class : 2 * per_class, 1] = 0  # A-only
    dirs[2 * per_class :, 0] = 0  # B-only
    active = torch.rand(n, n_feat, generator=g) < 3 / n_feat
    f = active * (0.5 + torch.rand(n, n_feat, generator=g))
    x = torch.einsum("nf,fsd->nsd", f, dirs)
    return x, dirs, labels


def classify_planted(cc: CrossCoder, dirs: torch.Tensor) -> list[str | None]:
    """Each planted feature's matched latent (cosine >= 0.9 over both sources) and its class."""
    dec = (cc.W_dec.detach() / cc.act_scale).view(cc.d_sae, 2, -1)
    flat = torch.nn.functional.normalize(dec.reshape(cc.d_sae, -1), dim=1)
    truth = torch.nn.functional.normalize(dirs.reshape(len(dirs), -1), dim=1)
    best = (truth @ flat.T).max(dim=1)
    labels = classify(relative_norms(cc))
    return [labels[j] if c >= 0.9 else None for c, j in zip(best.values.tolist(), best.indices.tolist(), strict=True)]


@pytest.mark.parametrize(("sparsifier", "extra"), [("relu", {"l1_coeff": 0.3}), ("batchtopk", {"k": 4})])
def test_planted_features_are_recovered_and_classified(sparsifier, extra, tmp_path) -> None:
    x, dirs, truth = planted_pair(24_000, 16, per_class=12)
    cfg = TrainConfig(
        out_dir=str(tmp_path), batch_size=512, epochs=15, lr=3e-3, warmup_steps=20, checkpoint_every=0,
        dead_after_tokens=20_000, geometric_median_samples=512,
    )  # fmt: skip
    torch.manual_seed(0)
    cc = CrossCoder(SAEConfig(d_in=16, d_sae=72, n_sources=2, sparsifier=sparsifier, **extra))
    Trainer(cfg, cc, ArrayActivations(x.reshape(len(x), -1), seed=0)).fit()
    predicted = classify_planted(cc, dirs)
    lines = [f"{sparsifier}: class      precision  recall"]
    for c in CLASSES:
        hits = sum(p == c and t == c for p, t in zip(predicted, truth, strict=True))
        said = sum(p == c for p in predicted)
        recall, precision = hits / truth.count(c), hits / max(said, 1)
        lines.append(f"{sparsifier}: {c:<10} {precision:9.2f}  {recall:6.2f}")
        assert recall >= 0.8 and precision >= 0.8, (c, precision, recall)
    print("\n".join(lines))
    cos = decoder_cosines(cc)
    assert cos.shape == (72,) and torch.isfinite(cos).all()


def test_finetune_makes_a_diffable_pair(tiny_model, tiny_model_dir, corpus_dir, tmp_path) -> None:
    import json

    from saelab.activations import check_sources
    from saelab.cli import main
    from saelab.models import load_model
    from saelab.nexttoken import next_token_logprobs

    out = tmp_path / "tuned"
    args = ["finetune", "--base", str(tiny_model_dir), "--dataset", str(corpus_dir), "--out", str(out)]
    assert main([*args, "--steps", "4", "--batch_size", "2", "--context_size", "16", "--lr", "1e-3"]) == 0
    assert len(json.loads((out / "finetune.json").read_text())["loss"]) == 4
    tuned = load_model(str(out), device="cpu")
    toks = torch.tensor([tiny_model.tokenize([(corpus_dir / "doc0.txt").read_text()[:400]])[0]])

    @torch.no_grad()
    def ce(model) -> float:
        return float(next_token_logprobs(model.run_with_hooks(toks), toks)[1].mean())

    assert ce(tuned) < ce(tiny_model)  # four small steps on the corpus already lower its loss
    pair = [(tiny_model, "blocks.1.hook_resid_post"), (tuned, "blocks.1.hook_resid_post")]
    assert check_sources(pair) == 32
    assert main(["finetune", "--base", str(tiny_model_dir), "--dataset", str(corpus_dir), "--out", str(out),
                 "--steps", "0"]) == 2  # fmt: skip


def test_train_a_crosscoder_on_two_layers_from_the_cli(tiny_model_dir, corpus_dir, tmp_path, capsys) -> None:
    from test_cli import tiny_args

    from saelab.activations import ActivationCache
    from saelab.cli import main

    out = tmp_path / "cc"
    # Two corpora mixed, so the diffing report can say which one each latent's top examples come from.
    (tmp_path / "other.txt").write_text(" ".join(f"w{i % 97} {i}" for i in range(3_000)))
    mix = f"{corpus_dir}+{tmp_path / 'other.txt'}"
    args = [*tiny_args(tiny_model_dir, corpus_dir, out), "--sae.sparsifier", "batchtopk", "--data.dataset", mix]
    assert main(["train", *args, "--data.cross_sources", "blocks.0.hook_resid_post"]) == 0
    cc = SAE.load(out)
    assert isinstance(cc, CrossCoder) and (cc.n_sources, cc.d_source, cc.d_sae) == (2, 32, 64)
    cache = ActivationCache(out / "activations")
    assert (cache.meta["n_sources"], cache.meta["d_in"]) == (2, 32)
    x = cache.source().rows(np.arange(8)).view(8, 2, 32)
    assert cc(x).recon.shape == (8, 2, 32)
    assert main(["train", *args, "--data.cross_sources", "blocks.1.hook_resid_post"]) == 2
    # The analysis reads both sources and stores the diffing view next to the usual feature data.
    from saelab.activations import keep_mask
    from saelab.corpus import token_sequences
    from saelab.models import load_model
    from saelab.rundir import RunDir
    from saelab.store import FeatureStore

    store = tmp_path / "features.duckdb"
    assert main(["analyze", str(out), "--tokens", "256", "--store", str(store), "--n_top", "3"]) == 0
    with FeatureStore(store) as fs:
        info = fs.sae("cc")
        assert info.cfg["n_sources"] == 2 and len(info.params["sources"]) == 2
        diff = fs.diffing("cc")
        assert len(diff) == 64 and sum(fs.diffing_counts("cc").values()) == 64
        np.testing.assert_allclose(diff["rel_norm"], relative_norms(cc).numpy(), rtol=1e-5)
        assert diff["diff_class"].tolist() == classify(relative_norms(cc))
        # Max activations match a brute-force pass over the same held-out tokens and both sources.
        model = load_model(str(tiny_model_dir), device="cpu")
        data = RunDir(out).data_config()
        toks = token_sequences(model, data, "eval", 256)
        x = source_activations([(model, "blocks.1.hook_resid_post"), (model, "blocks.0.hook_resid_post")], toks)
        x = x.reshape(-1, 64)
        cc.eval()
        with torch.no_grad():
            dense = cc.encode(x[keep_mask(x, cc.cfg.exclude_norm_above)])
        rows = fs.feature_list("cc", sort="feature", descending=False, limit=64).rows
        want = dense.max(0).values
        for r in rows:
            if r.n_fires:
                assert r.max_act == pytest.approx(float(want[r.feature]), rel=1e-4)
        dash = fs.dashboard("cc", rows[0].feature)
        assert len(dash.source_norms) == 2 and dash.diff_class in CLASSES
        assert dash.nu_error == pytest.approx(diff["nu_error"][rows[0].feature], nan_ok=True)
        # Latent Scaling ratios, streamed chunk by chunk, equal one pass over all kept tokens.
        kept = x[keep_mask(x, cc.cfg.exclude_norm_above)]
        fit = ScalingRatios(cc.decoder_directions().view(64, 2, 32))
        with torch.no_grad():
            fit.update(kept.view(-1, 2, 32), cc.decode(dense).view(-1, 2, 32), dense)
        for key, want_nu in fit.ratios().items():
            np.testing.assert_allclose(diff[key].to_numpy(), want_nu.numpy(), rtol=1e-4, atol=1e-6)
        assert np.isfinite(diff["nu_error"][[r.feature for r in rows if r.n_fires]]).all()
        low = (diff["nu_error"] < 0.5) & (diff["nu_recon"] < 0.5)
        assert fs.diffing_counts("cc", nu_below=0.5) == diff[low]["diff_class"].value_counts().to_dict()
    # `saelab diff` prints the counts, then per source the fired latents leaning most to it, with examples.
    capsys.readouterr()
    assert main(["diff", "cc", "--store", str(store), "--top", "2", "--examples", "1"]) == 0
    text = capsys.readouterr().out
    counts = {c: int((diff["diff_class"] == c).sum()) for c in CLASSES}
    assert all(f"{c:<8} {n:>8}" in text for c, n in counts.items())
    by_rel = diff[diff["nu_error"].notna()].sort_values("rel_norm")["feature"].tolist()
    to_b, to_a = text.split("latents leaning most to B")[1].split("latents leaning most to A")
    assert [int(w[1:]) for w in to_b.split() if w.startswith("#")] == by_rel[::-1][:2]
    assert [int(w[1:]) for w in to_a.split() if w.startswith("#")] == by_rel[:2]
    assert to_a.count("[") == 2  # one example per latent, its token in brackets
    # Per listed latent, how many stored top examples come from each corpus (odd sequences: other.txt).
    assert f"top examples by corpus ({corpus_dir.name} / other.txt)" in text
    with FeatureStore(store) as fs:
        for line in (to_b + to_a).splitlines():
            if line.lstrip().startswith("#"):
                seqs = [ex.seq for ex in fs.dashboard("cc", int(line.split()[0][1:])).top_examples]
                n_other = sum(s % 2 for s in seqs)
                assert line.endswith(f"top examples {len(seqs) - n_other} / {n_other}") and seqs
    assert main(["diff", "nope", "--store", str(store)]) == 2
    # Training evaluated the crosscoder spliced into each source's model (eval_tokens = 256): source 1
    # (layer 0) gets its own slice of the joint reconstruction, and CE matches a manual splice.
    import json

    from saelab.nexttoken import next_token_logprobs
    from saelab.results import format_table

    result = json.loads((out / "eval.json").read_text())
    assert [s["source"] for s in result["per_source"]] == [f"{model.name}@blocks.1.hook_resid_post",
                                                            f"{model.name}@blocks.0.hook_resid_post"]  # fmt: skip
    assert "source" in format_table(result) and result["eval_tokens"] == toks.numel()
    with torch.no_grad():
        flat = x.view(-1, 2, 32)
        recon = cc.decode(cc.encode(flat))[:, 1]
        keep = keep_mask(flat.reshape(len(flat), -1), cc.cfg.exclude_norm_above)
        new = torch.where(keep[:, None], recon, flat[:, 1]).view(*toks.shape, 32)
        logits = model.run_with_hooks(toks, [("blocks.0.hook_resid_post", lambda act, hook: new.to(act))])
    ce = next_token_logprobs(logits, toks)[1].mean().item()
    assert result["per_source"][1]["ce_loss_sae"] == pytest.approx(ce, rel=1e-4)
