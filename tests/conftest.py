"""Shared fixtures: a tiny random Llama saved as a local HF directory, and a small text corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
    "and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
    "Now is the winter of our discontent made glorious summer by this sun of York. "
    "All the world's a stage, and all the men and women merely players; they have their exits and "
    "their entrances, and one man in his time plays many parts. "
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Datasets caches go to a temp dir; the offline model cache stays shared (converting it is slow)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small plain-text documents."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"doc{i}.txt").write_text(TEXT * (20 + 5 * i))
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights and a 300-token BPE tokenizer, as a local HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )  # peaked logits, so ablations visibly change the loss
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    """The tiny Llama loaded through saelab.models (TransformerLens 3 or 4, whichever is installed)."""
    from saelab.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def app_store(tiny_model, tiny_model_dir, corpus_dir, tmp_path_factory) -> Path:
    """A store holding 'sae' (trained topk, with curves and eval), 'cc' (a crosscoder over two layers of
    a mixture of two corpora) and 'signed' (a random abstopk SAE, never trained)."""
    from test_analysis import tiny_data, tiny_run
    from test_cli import tiny_args

    from saelab import SAE
    from saelab.analysis import analyze
    from saelab.cli import main
    from saelab.config import AnalysisConfig

    tmp = tmp_path_factory.mktemp("app")
    store = tmp / "features.duckdb"
    sae, cc = tmp / "sae", tmp / "cc"
    assert main(["train", *tiny_args(tiny_model_dir, corpus_dir, sae)]) == 0
    (tmp / "other.txt").write_text(" ".join(f"w{i % 97} {i}" for i in range(3_000)))
    mix = f"{corpus_dir}+{tmp / 'other.txt'}"
    args = [*tiny_args(tiny_model_dir, corpus_dir, cc), "--sae.sparsifier", "batchtopk", "--data.dataset", mix]
    assert main(["train", *args, "--data.cross_sources", "blocks.0.hook_resid_post"]) == 0
    cfg = AnalysisConfig(n_tokens=512, model_batch_size=8, n_top=4, per_band=2, context_before=6, min_context=2)
    for run in (sae, cc):
        analyze(run, store, cfg)
    signed = tiny_run(tmp, "abstopk")
    sae = SAE.load(signed)
    with torch.no_grad():  # feature 0's pre-activation is always 0: it never wins the top-k by |pre|
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = 0
    sae.save(signed)
    analyze(signed, store, cfg, sae_id="signed", model=tiny_model, data=tiny_data(tiny_model_dir, corpus_dir))
    return store
