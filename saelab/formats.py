"""Reading SAEs saved by other libraries as saelab SAEs, exactly.

`SAE.load(path)` reads saelab's own directories, and through `read` these others:

- **SAELens 6.x** (`cfg.json` + `sae_weights.safetensors`): standard (-> relu), topk, abstopk,
  jumprelu (also what SAELens exports batchtopk and matryoshka SAEs as), gated (-> its exact JumpReLU
  equivalent) and training checkpoints of batchtopk / matryoshka (their scalar threshold);
  `apply_b_dec_to_input`, `rescale_acts_by_decoder_norm` and an `expected_average_only_in` scaling
  factor (from `activation_scaler.json` when not folded) are honoured.
- **sparsify** (`cfg.json` + `sae.safetensors`, one folder per hook point such as `layers.6`).
- **Gemma Scope** (`params.npz`).
- **dictionary_learning** (`ae.pt` + `config.json`): AutoEncoder, AutoEncoderNew, AutoEncoderTopK,
  BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder.

`locate` finds them locally or on the Hugging Face hub ('org/name' and a subfolder; the local cache
with HF_HUB_OFFLINE=1), `release` by SAELens release name. Every import is a change of parameters,
never an approximation: the saelab SAE computes the same
codes and reconstructions (up to float rounding). What saelab cannot represent exactly (per-token
input normalisation, skip connections, transcoders, group-max activations, ...) is refused with a
message that names it. Nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from saelab.config import SAEConfig
from saelab.errors import CheckpointError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"


@dataclass
class Imported:
    """An SAE read from another library's files, as saelab's config and parameters."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    """saelab state-dict entries: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, act_scale,
    and `sparsifier.threshold` for jumprelu."""
    source: str
    """What it was read as, e.g. 'SAELens 6.54.12 gated'."""


def _imported(
    source: str,
    W_enc: Tensor,
    W_dec: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    sparsifier: str,
    k: int = 1,
    threshold: Tensor | None = None,
    scale: float = 1.0,
    hook: str = "",
    model: Any = "",
) -> Imported:
    """The saelab config and state dict of an SAE given in saelab's parameterisation (b_enc already for an
    encoder that subtracts b_dec; `scale` the input scale)."""
    cfg = SAEConfig(
        d_in=W_enc.shape[0], d_sae=W_enc.shape[1], sparsifier=sparsifier, k=k, hook_name=hook,
        model_name=model if isinstance(model, str) else "",
    )  # fmt: skip
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "act_scale": torch.tensor(scale)}
    if threshold is not None:
        tensors["sparsifier.threshold"] = threshold
    return Imported(cfg, tensors, source)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a clear error for a corrupt or non-object file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return raw


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or a clear error for a missing, truncated or corrupt one."""
    if not path.is_file():
        raise CheckpointError(f"weights file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from e


def _need(tensors: dict[str, Tensor], names: list[str], where: Path) -> list[Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{where} lacks {missing} (it holds {sorted(tensors)})")
    return [tensors[n].float() for n in names]


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def locate(source: str | Path, subfolder: str | None = None) -> Path:
    """The local file or folder of an SAE: `source` itself (a path), or a Hugging Face repo id ('org/name')
    downloaded with `huggingface_hub` (only `subfolder` of it), or found in the local cache when
    HF_HUB_OFFLINE=1."""
    local = Path(source)
    if local.exists():
        path = local / subfolder if subfolder else local
        if not path.exists():
            raise CheckpointError(f"{local} has no {subfolder!r}")
        return path
    if not HUB_REPO.fullmatch(str(source)):
        raise CheckpointError(f"no SAE at {source}: no such file or directory, and not a hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    folder = (subfolder or "").strip("/")
    try:
        root = Path(snapshot_download(str(source), allow_patterns=[f"{folder}/*"] if folder else None))
    except Exception as e:  # no network, not cached, no such repo, gated repo: one message for all
        where = f"{source}/{folder}" if folder else str(source)
        raise CheckpointError(f"cannot get {where} from the Hugging Face hub or its local cache: {e}") from e
    path = root / folder if folder else root
    if not path.exists():
        raise CheckpointError(f"hub repo {source} has no folder {folder!r}")
    return path


def release(name: str, sae_id: str) -> tuple[str, str, str]:
    """(hub repo, folder, model) of an SAE named as in SAELens's registry of released SAEs
    (`pretrained_saes.yaml`), which needs sae-lens installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise CheckpointError(
            "release names come from SAELens's registry: install sae-lens (beside transformer-lens<4), or load "
            "the repo and folder directly: SAE.load('org/repo', subfolder='...')"
        ) from None
    import difflib

    directory = get_pretrained_saes_directory()
    if name not in directory:
        close = difflib.get_close_matches(name, list(directory), n=5)
        raise CheckpointError(f"no SAELens release {name!r}; close: {close or 'none'}")
    lookup = directory[name]
    if sae_id not in lookup.saes_map:
        close = difflib.get_close_matches(sae_id, list(lookup.saes_map), n=5)
        raise CheckpointError(f"release {name!r} has no SAE {sae_id!r}; close: {close or 'none'}")
    return lookup.repo_id, lookup.saes_map[sae_id], lookup.model


def read(path: str | Path) -> Imported | None:
    """The SAE at `path` read from another library's format; None for a saelab directory (or one that
    is none of these, which `SAE.load` then explains)."""
    path = Path(path)
    if path.is_file() and path.name == GEMMA_SCOPE_PARAMS:
        return _gemma_scope(path)
    if not path.is_dir():
        return None
    cfg_path = path / "cfg.json"
    if cfg_path.is_file():
        raw = read_json(cfg_path)
        if "saelab_format" in raw:
            return None
        if (path / SAELENS_WEIGHTS).is_file():
            return _saelens(path, raw)
        if (path / SPARSIFY_WEIGHTS).is_file():
            return _sparsify(path, raw)
    if (path / GEMMA_SCOPE_PARAMS).is_file():
        return _gemma_scope(path / GEMMA_SCOPE_PARAMS)
    if (path / DICTIONARY_LEARNING_WEIGHTS).is_file():
        return _dictionary_learning(path)
    inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "cfg.json").is_file())
    if inside and not cfg_path.is_file():
        shown = ", ".join(inside[:8]) + (", ..." if len(inside) > 8 else "")
        raise CheckpointError(f"{path} holds several SAEs ({shown}): load one of its folders, e.g. {path / inside[0]}")
    return None


def _centred(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, subtracts_b_dec: bool) -> Tensor:
    """`b_enc` for saelab's encoder, which always subtracts b_dec: for a format whose encoder does not,
    x @ W + b = (x - b_dec) @ W + (b + b_dec @ W)."""
    return b_enc if subtracts_b_dec else b_enc + b_dec @ W_enc


def _gated(
    W_enc: Tensor, b_gate: Tensor, r_mag: Tensor, b_mag: Tensor, b_dec: Tensor, subtracts: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """A Gated SAE (shared encoder matrix) as its exact JumpReLU: (W_enc, b_enc, threshold).

    Gate u + b_gate > 0, magnitude relu(u e^r + b_mag), u the encoder's x W_enc: with W' = W_enc e^r the
    magnitude's pre-activation is pre' = u e^r + b_mag, and the gate opens where pre' > b_mag - e^r b_gate.
    """
    W = W_enc * r_mag.exp()
    return W, _centred(W, b_mag, b_dec, subtracts), b_mag - r_mag.exp() * b_gate


SAELENS_REFUSED_NORMS = {
    "constant_norm_rescale": "rescales every token to norm sqrt(d_in) and back (per token, not a fixed scale)",
    "layer_norm": "layer-normalises every token's input (a per-token map, not a fixed scale)",
    "covariance_whitening": "whitens its input with statistics kept outside the weights",
}
SAELENS_READABLE = ("standard", "topk", "abstopk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk")


def _saelens(path: Path, raw: dict[str, Any]) -> Imported:
    """SAELens 6.x: see the module docstring."""
    meta = dict(raw.get("metadata") or {})
    legacy = {"hook_point": "hook_name", "hook_name": "hook_name", "model_name": "model_name",
              "hook_point_head_index": "hook_head_index", "hook_head_index": "hook_head_index"}  # fmt: skip
    for old, new in legacy.items():
        if old in raw and new not in meta:
            meta[new] = raw[old]  # SAELens < 6 kept these at the top level
    arch = raw.get("architecture") or ("topk" if raw.get("activation_fn_str") == "topk" else "standard")
    where = path / "cfg.json"
    if arch not in SAELENS_READABLE:
        raise CheckpointError(
            f"{where}: SAELens architecture {arch!r} has no exact saelab equivalent "
            f"(saelab reads {', '.join(SAELENS_READABLE)})"
        )
    norm = raw.get("normalize_activations", "none")
    if norm is True or norm is False:  # SAELens < 6
        norm = "expected_average_only_in" if norm else "none"
    if norm in SAELENS_REFUSED_NORMS:
        raise CheckpointError(
            f"{where}: normalize_activations = {norm!r} {SAELENS_REFUSED_NORMS[norm]}; "
            "saelab cannot represent it exactly"
        )
    if norm not in ("none", "expected_average_only_in"):
        raise CheckpointError(f"{where}: unknown normalize_activations = {norm!r}")
    if raw.get("reshape_activations", "none") != "none":
        raise CheckpointError(
            f"{where}: reshape_activations = {raw['reshape_activations']!r} (attention heads) is not supported"
        )
    if meta.get("hook_head_index") is not None:
        raise CheckpointError(f"{where}: an SAE of one attention head (hook_head_index) is not supported")

    tensors = read_safetensors(path / SAELENS_WEIGHTS)
    weights = path / SAELENS_WEIGHTS
    W_enc, W_dec, b_dec = _need(tensors, ["W_enc", "W_dec", "b_dec"], weights)
    scale = 1.0
    if norm == "expected_average_only_in":
        scaler = path / "activation_scaler.json"
        factor = read_json(scaler).get("scaling_factor") if scaler.is_file() else tensors.get("scaling_factor")
        if factor is None:
            raise CheckpointError(
                f"{where}: normalize_activations = 'expected_average_only_in' but its scaling factor is neither in "
                f"{scaler.name} nor in the weights (SAELens folds it into the final SAE: load that one)"
            )
        scale = float(factor.reshape(-1)[0]) if isinstance(factor, Tensor) else float(factor)
    subtracts = bool(raw.get("apply_b_dec_to_input", True))
    threshold = None
    if arch == "gated":
        W_enc, b_enc, threshold = _gated(
            W_enc, *_need(tensors, ["b_gate", "r_mag", "b_mag"], weights), b_dec, subtracts
        )
    else:
        (b_enc,) = _need(tensors, ["b_enc"], weights)
        b_enc = _centred(W_enc, b_enc, b_dec, subtracts)
        if arch == "jumprelu":
            # SAELens < 6.20 trained log_threshold; saved files hold threshold, older ones may not.
            name = "threshold" if "threshold" in tensors or "log_threshold" not in tensors else "log_threshold"
            (threshold,) = _need(tensors, [name], weights)
            threshold = threshold if name == "threshold" else threshold.exp()
        elif arch in ("batchtopk", "matryoshka_batchtopk"):
            (t,) = _need(tensors, ["topk_threshold"], weights)
            threshold = torch.full_like(b_enc, float(t.reshape(-1)[0]))
    if raw.get("rescale_acts_by_decoder_norm") and arch in ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk"):
        # Codes are pre-activations times each latent's decoder norm, decoded through unit rows.
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None].clamp_min(1e-12)
    sparsifier = {"standard": "relu", "topk": "topk", "abstopk": "abstopk"}.get(arch, "jumprelu")
    k = int(raw.get("k") or 1) if sparsifier in ("topk", "abstopk") else 1
    version = meta.get("sae_lens_version", "")
    # With an unfolded scale s, SAELens reads x s and writes its output / s: saelab's act_scale, with
    # every other parameter in the scaled units as they are.
    return _imported(
        f"SAELens {version} {arch}".replace("  ", " "), W_enc, W_dec, b_enc, b_dec, sparsifier, k, threshold, scale,
        meta.get("hook_name") or "", meta.get("model_name") or "",
    )  # fmt: skip


def _sparsify(path: Path, raw: dict[str, Any]) -> Imported:
    """sparsify (EleutherAI): encoder.weight [n, d_in], encoder.bias, W_dec [n, d_in], b_dec; relu then top-k."""
    where = path / "cfg.json"
    for key, bad in (("activation", "groupmax"), ("skip_connection", True), ("transcode", True)):
        if raw.get(key) == bad:
            what = {"groupmax": "group-max activations", True: key.replace("_", " ")}[bad]
            raise CheckpointError(f"{where}: {key} = {bad!r}: saelab has no exact equivalent of {what}")
    weights = path / SPARSIFY_WEIGHTS
    tensors = read_safetensors(weights)
    enc_w, enc_b, W_dec, b_dec = _need(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights)
    W_enc = enc_w.T.contiguous()
    if "k" not in raw:
        raise CheckpointError(f"{where} gives no k")
    # sparsify reads `layers.N` as the output of decoder layer N: TransformerLens's blocks.N.hook_resid_post.
    m = re.fullmatch(r"(?:layers|h)\.(\d+)", path.name)
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else ""
    # sparsify's trainer writes its run config (with the model it read) beside the hook point folders.
    run_cfg = path.parent / "config.json"
    model = read_json(run_cfg).get("model") or "" if run_cfg.is_file() else ""
    return _imported(f"sparsify {path.name}", W_enc, W_dec, enc_b, b_dec, "topk", int(raw["k"]), hook=hook, model=model)


def _gemma_scope(path: Path) -> Imported:
    """Gemma Scope's params.npz: a JumpReLU whose encoder does not subtract b_dec."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name.replace("w_", "W_"): torch.from_numpy(np.array(npz[name])) for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from e
    W_enc, W_dec, b_enc, b_dec, threshold = _need(arrays, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path)
    # Gemma Scope's residual-stream SAEs read the output of decoder layer L (`layer_L/` in the repo).
    m = re.search(r"layer_(\d+)", str(path))
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m and "-res" in str(path) else ""
    b_enc = _centred(W_enc, b_enc, b_dec, subtracts_b_dec=False)
    return _imported("Gemma Scope", W_enc, W_dec, b_enc, b_dec, "jumprelu", threshold=threshold, hook=hook)


def _dictionary_learning(path: Path) -> Imported:
    """dictionary_learning (saprmarks): `ae.pt` (a state dict, read with weights_only) and `config.json`,
    whose trainer.dict_class names the class."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path} has {DICTIONARY_LEARNING_WEIGHTS} but no config.json to say which dictionary it is"
        )
    trainer = read_json(cfg_path).get("trainer") or {}
    kind = trainer.get("dict_class")
    weights = path / DICTIONARY_LEARNING_WEIGHTS
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated, foreign or pickled-object file
        raise CheckpointError(f"{weights} is truncated, corrupt or not a plain state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("ae"), dict):
        state = state["ae"]  # a backup written mid-training: {"step", "ae", "optimizer", ...}
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights} is not a state dict")
    subtracts, threshold, k = True, None, 1
    if kind in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder"):
        enc = _need(state, ["encoder.weight"], weights)[0]
        (dec,) = _need(state, ["decoder.weight"], weights)
        W_enc, W_dec = enc.T.contiguous(), dec.T.contiguous()
    if kind == "AutoEncoder":
        b_enc, b_dec = _need(state, ["encoder.bias", "bias"], weights)
        sparsifier = "relu"
    elif kind == "AutoEncoderNew":
        b_enc, b_dec = _need(state, ["encoder.bias", "decoder.bias"], weights)
        sparsifier, subtracts = "relu", False
    elif kind == "AutoEncoderTopK":
        b_enc, b_dec, k_t = _need(state, ["encoder.bias", "b_dec", "k"], weights)
        sparsifier, k = "topk", int(k_t)
    elif kind in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        if kind == "MatryoshkaBatchTopKSAE":
            W_enc, b_enc, W_dec, b_dec, t = _need(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], weights)
        else:
            b_enc, b_dec, t = _need(state, ["encoder.bias", "b_dec", "threshold"], weights)
        # Inference keeps relu(pre) where it is above one threshold (strictly): a JumpReLU.
        sparsifier, threshold = "jumprelu", torch.full_like(b_enc, float(t.reshape(-1)[0]))
    elif kind == "JumpReluAutoEncoder":
        W_enc, b_enc, W_dec, b_dec, threshold = _need(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], weights)
        sparsifier, subtracts = "jumprelu", False
    elif kind == "GatedAutoEncoder":
        b_gate, r_mag, b_mag, b_dec = _need(state, ["gate_bias", "r_mag", "mag_bias", "decoder_bias"], weights)
        W_enc, b_enc, threshold = _gated(W_enc, b_gate, r_mag, b_mag, b_dec, subtracts=True)
        sparsifier = "jumprelu"
    else:
        raise CheckpointError(f"{cfg_path}: dictionary_learning class {kind!r} is not one saelab reads")
    b_enc = _centred(W_enc, b_enc, b_dec, subtracts)
    source = f"dictionary_learning {kind}"
    return _imported(source, W_enc, W_dec, b_enc, b_dec, sparsifier, k, threshold, model=trainer.get("lm_name") or "")
