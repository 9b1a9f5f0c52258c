"""Writing saelab SAEs as other libraries save theirs: `saelab export RUN --format saelens|sparsify --out DIR`.

A run directory's final SAE is already in SAELens's layout where SAELens has the architecture
(`SAE.save`); the export writes a folder that holds nothing else, of any SAE `SAE.load` reads (one
imported from elsewhere, too), or sparsify's layout. Both fold the input scale in exactly
(`SAE.saelens_layout`), so the other library finds the same latents with the same values.

- SAELens 6 (`cfg.json` + `sae_weights.safetensors`, loadable with `sae_lens.SAE.load_from_disk`):
  relu (as standard), topk, abstopk, batchtopk / featurechoice / jumprelu (as jumprelu).
- sparsify (`cfg.json` + `sae.safetensors`, `SparseCoder.load_from_disk`): topk.

Crosscoders and Mutual Choice (whose inference rule allocates latents over the whole batch) have no
equivalent in either and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from saelab.errors import CheckpointError
from saelab.files import replacing, write_atomic
from saelab.formats import SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from saelab.sae import SAE

FORMATS = ("saelens", "sparsify")


def export(sae: SAE, out: str | Path, fmt: str) -> Path:
    """Write `sae` to the folder `out` in `fmt` ('saelens' or 'sparsify'); returns the folder."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if fmt == "sparsify" and sae.cfg.sparsifier != "topk":
        raise CheckpointError(f"sparsify reads top-k SAEs; a {sae.cfg.sparsifier} SAE cannot be exported to it")
    tensors, cfg = sae.saelens_layout()
    weights_file = SAELENS_WEIGHTS
    if fmt == "sparsify":
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
        weights_file = SPARSIFY_WEIGHTS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / weights_file) as tmp:
        save_file(tensors, str(tmp))
    write_atomic(out / "cfg.json", json.dumps(cfg))
    return out
