"""Model loading through saelab.models on a tiny random Llama (TransformerLens 3 or 4)."""

from __future__ import annotations

import pytest
import torch

from saelab.models import tl_major


def test_tiny_model_loads_and_hooks(tiny_model) -> None:
    assert tiny_model.d_model == 32 and tiny_model.n_layers == 2
    toks = torch.tensor([tiny_model.tokenize(["To be, or not to be, that is the question"])[0][:8]])
    acts = tiny_model.activations(toks, "blocks.1.hook_resid_post")
    assert acts.shape == (1, 8, 32)
    assert tiny_model.hook_width("blocks.0.hook_mlp_out") == 32
    assert tl_major() in (3, 4)


def test_unknown_hook_point_is_a_clear_error(tiny_model) -> None:
    with pytest.raises(ValueError, match=r"no hook point 'blocks.7.hook_resid_post'.*close matches"):
        tiny_model.check_hook("blocks.7.hook_resid_post")


def test_hooks_are_removed_after_an_exception(tiny_model) -> None:
    toks = torch.tensor([[3, 4, 5, 6]])
    clean = tiny_model.run_with_hooks(toks)

    def boom(act, hook):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"):
        tiny_model.run_with_hooks(toks, [("blocks.0.hook_resid_post", boom)])
    torch.testing.assert_close(tiny_model.run_with_hooks(toks), clean)


def test_splice_hook_replaces_activation(tiny_model) -> None:
    toks = torch.tensor([[3, 4, 5, 6]])
    clean = tiny_model.run_with_hooks(toks)
    same = tiny_model.run_with_hooks(toks, [("blocks.0.hook_resid_post", lambda a, hook: a.clone())])
    zeroed = tiny_model.run_with_hooks(toks, [("blocks.0.hook_resid_post", lambda a, hook: torch.zeros_like(a))])
    torch.testing.assert_close(same, clean)
    assert (zeroed - clean).abs().max() > 1e-3
