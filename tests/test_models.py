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


def test_incremental_forward_gives_the_logits_of_a_full_pass(tiny_model) -> None:
    ids = torch.tensor([tiny_model.tokenize(["To be, or not to be, that is the question"])[0][:10]])
    full = tiny_model.run_with_hooks(ids)
    for use_cache in (True, False):
        step = tiny_model.incremental_forward(use_cache)
        seen: list[int] = []
        with tiny_model.hooked([("blocks.1.hook_resid_post", lambda act, hook, seen=seen: seen.append(act.shape[1]))]):
            parts = [step(ids[:, :6]), step(ids[:, 6:7]), step(ids[:, 7:10])]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
        assert seen == ([6, 1, 3] if use_cache else [6, 7, 10])  # the cache runs only the new positions


@pytest.mark.skipif(tl_major() >= 4, reason="TransformerLens 3's HookedTransformer only")
def test_tl3_weights_are_stored_as_its_forward_reads_them(tiny_model) -> None:
    import copy

    from torch.profiler import profile

    toks = torch.tensor([[3, 4, 5, 6]])
    plain = copy.deepcopy(tiny_model.tl)
    for p in plain.parameters():
        p.data = p.data.contiguous()
    assert torch.equal(tiny_model.tl(toks), plain(toks))  # the same numbers, bit for bit

    def weight_copies(model) -> int:
        weights = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].lstrip("_").startswith("W_")]
        shapes = {tuple(sorted(p.shape)) for p in weights}
        with profile(record_shapes=True) as prof:
            model(toks)
        return sum(e.name == "aten::copy_" and tuple(sorted(e.input_shapes[0])) in shapes for e in prof.events())

    assert weight_copies(plain) > 0 and weight_copies(tiny_model.tl) == 0


def test_activation_gradients_are_the_lm_losss(tiny_model) -> None:
    torch.manual_seed(0)
    toks = torch.randint(3, 300, (3, 12))
    hook = "blocks.0.hook_resid_post"
    acts, grads = tiny_model.activations_and_grads(toks, hook, chunk=2)
    assert torch.allclose(acts, tiny_model.activations(toks, hook), atol=1e-5)
    assert float(grads[:, -1].abs().max()) == 0.0  # the last position predicts nothing that is scored
    assert all(p.requires_grad for p in tiny_model.tl.parameters())  # the weights are left as they were

    def loss(step: float) -> float:
        def shift(act: torch.Tensor, hook) -> torch.Tensor:
            return act + step * grads.to(act)

        with torch.no_grad():
            logits = tiny_model.run_with_hooks(toks, [(hook, shift)]).double()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten(), reduction="sum")
        return float(ce)

    eps = 1e-3 / float(grads.norm())
    # The directional derivative along the gradient is its squared norm.
    assert (loss(eps) - loss(-eps)) / (2 * eps) == pytest.approx(float(grads.norm() ** 2), rel=0.05)
