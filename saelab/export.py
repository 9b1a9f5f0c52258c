"""Writing saelab SAEs as other libraries save theirs: `saelab export RUN --format saelens|sparsify --out DIR`.

saelab keeps its input scale `act_scale` (s) apart from the weights, so that training resumes exactly;
the others fold it in. The export folds it exactly: s W_enc, W_dec / s and b_dec / s compute the same
pre-activations and reconstructions, so the other library finds the same latents with the same values
(up to float rounding). BatchTopK and Feature Choice keep relu(pre) >= t at inference; SAELens writes
that as a JumpReLU, which keeps pre > t', so t' is the float just below t.

- SAELens 6 (`cfg.json` + `sae_weights.safetensors`, loadable with `sae_lens.SAE.load_from_disk`):
  relu (as standard), topk, abstopk, batchtopk / featurechoice / jumprelu (as jumprelu).
- sparsify (`cfg.json` + `sae.safetensors`, `SparseCoder.load_from_disk`): topk.

Crosscoders and Mutual Choice (whose inference rule allocates latents over the whole batch) have no
equivalent in either and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.errors import CheckpointError
from saelab.files import replacing, write_atomic
from saelab.formats import SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from saelab.sae import SAE

FORMATS = ("saelens", "sparsify")
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "abstopk": "abstopk"}
THRESHOLDED = ("batchtopk", "featurechoice", "jumprelu")
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads nested metadata only from files of version >= 6."""


def _folded(sae: SAE) -> dict[str, Tensor]:
    """W_enc, W_dec, b_enc, b_dec with act_scale folded in (the SAE then reads raw activations)."""
    if sae.cfg.n_sources > 1:
        raise CheckpointError("a crosscoder has no equivalent in SAELens or sparsify; it cannot be exported")
    s = float(sae.act_scale)
    with torch.no_grad():
        return {
            "W_enc": (sae.W_enc * s).float().contiguous(),
            "W_dec": (sae.W_dec / s).float().contiguous(),
            "b_enc": sae.b_enc.float().clone(),
            "b_dec": (sae.b_dec / s).float().contiguous(),
        }


def _jump_threshold(sae: SAE) -> Tensor:
    """The JumpReLU threshold [d_sae] that keeps exactly what `sae`'s thresholded sparsifier keeps."""
    t = sae.sparsifier.threshold.detach().float()
    if sae.cfg.sparsifier == "jumprelu":
        return t.clone()
    # relu(pre) >= t  <=>  pre > (the float just below t), for t > 0; for t <= 0 both keep relu(pre).
    below = torch.nextafter(t, torch.tensor(-torch.inf))
    return below.expand(sae.d_sae).clone()


def export(sae: SAE, out: str | Path, fmt: str) -> Path:
    """Write `sae` to the folder `out` in `fmt` ('saelens' or 'sparsify'); returns the folder."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    name = sae.cfg.sparsifier
    out = Path(out)
    tensors = _folded(sae)
    if fmt == "saelens":
        if name not in SAELENS_ARCH and name not in THRESHOLDED:
            raise CheckpointError(
                f"a {name} SAE has no SAELens equivalent: its inference rule allocates latents over the whole batch"
            )
        cfg = {
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "model_name": sae.cfg.model_name or None,
                "hook_name": sae.cfg.hook_name or None,
                "exported_by": "saelab",
            },
            "architecture": SAELENS_ARCH.get(name, "jumprelu"),
        }
        if name in ("topk", "abstopk"):
            cfg |= {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
        if name in THRESHOLDED:
            tensors["threshold"] = _jump_threshold(sae)
        weights_file, cfg_text = SAELENS_WEIGHTS, json.dumps(cfg)
    else:
        if name != "topk":
            raise CheckpointError(f"sparsify reads top-k SAEs; a {name} SAE cannot be exported to it")
        tensors = {
            "encoder.weight": tensors["W_enc"].T.contiguous(),
            "encoder.bias": tensors["b_enc"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
        }
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, sae.d_sae // sae.d_in),
            "normalize_decoder": True,
            "num_latents": sae.d_sae,
            "k": sae.cfg.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": sae.d_in,
        }
        weights_file, cfg_text = SPARSIFY_WEIGHTS, json.dumps(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / weights_file) as tmp:
        save_file(tensors, str(tmp))
    write_atomic(out / "cfg.json", cfg_text)
    return out
