"""Feature columns that come from the weights alone: logit effects, neighbours, crosscoder diffing."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.analysis.spill import Sources
from saelab.config import AnalysisConfig
from saelab.diffing import classify, decoder_cosines, relative_norms
from saelab.models import LanguageModel
from saelab.sae import SAE

WEIGHT_BLOCK = 1024
"""Features per block when computing logit effects and neighbours (bounds the [block, vocab] matrix)."""


@torch.no_grad()
def logits_and_neighbours(
    sae: SAE, sources: Sources, dirs: torch.Tensor, cfg: AnalysisConfig, desc: str
) -> dict[str, np.ndarray]:
    """Logit effects through the unembedding and decoder-cosine neighbours of every feature.

    `dirs` [d_sae, S, d] are the latents' decoders per source in model units; a crosscoder latent's
    logit effect is read through the source it writes to most.
    """
    W_dec = sae.W_dec.detach().float()
    dominant = dirs.norm(dim=2).argmax(1)
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n_log, n_nb = cfg.n_logits, min(cfg.n_neighbours, sae.d_sae - 1)
    out: dict[str, list[np.ndarray]] = {
        name: []
        for name in ("pos_token_ids", "pos_logits", "neg_token_ids", "neg_logits", "neighbours", "neighbour_cos")
    }
    for lo in tqdm(range(0, sae.d_sae, WEIGHT_BLOCK), desc=f"{desc}: logits + neighbours", unit="block", leave=False):
        hi = min(lo + WEIGHT_BLOCK, sae.d_sae)
        logits = _logits(sources, dirs[lo:hi], dominant[lo:hi])
        pos = logits.topk(min(n_log, logits.shape[1]), dim=1)
        neg = (-logits).topk(min(n_log, logits.shape[1]), dim=1)
        out["pos_token_ids"].append(pos.indices.numpy())
        out["pos_logits"].append(pos.values.numpy())
        out["neg_token_ids"].append(neg.indices.numpy())
        out["neg_logits"].append(-neg.values.numpy())
        sims = unit[lo:hi] @ unit.T
        sims[torch.arange(hi - lo), torch.arange(lo, hi)] = -math.inf
        nb = sims.topk(n_nb, dim=1)
        out["neighbours"].append(nb.indices.cpu().numpy())
        out["neighbour_cos"].append(nb.values.cpu().numpy())
    return {
        k: np.concatenate(v).astype(np.int32 if "ids" in k or k == "neighbours" else np.float32) for k, v in out.items()
    }


def _logits(sources: Sources, dirs: torch.Tensor, dominant: torch.Tensor) -> torch.Tensor:
    """Direct logit effects [n, vocab] of latents' directions [n, S, d], each through its dominant source."""
    parts = {
        s: sources[s][0].direction_logits(dirs[dominant == s, s]).float().cpu() for s in dominant.unique().tolist()
    }
    out = torch.empty(len(dirs), next(iter(parts.values())).shape[1])
    for s, part in parts.items():
        out[dominant == s] = part
    return out


@torch.no_grad()
def diffing_columns(sae: SAE, dirs: torch.Tensor) -> dict[str, Any]:
    """Per-latent decoder norm in each source [d_sae, S] and, for two sources, relative norm, decoder
    cosine and class (`saelab.diffing`)."""
    cols: dict[str, Any] = {"source_norms": dirs.norm(dim=2).double().numpy()}
    if dirs.shape[1] == 2:
        rel = relative_norms(sae)
        cols |= {
            "rel_norm": rel.double().numpy(),
            "dec_cos": decoder_cosines(sae).double().numpy(),
            "diff_class": classify(rel),
        }
    return cols


def vocab_texts(model: LanguageModel) -> list[str]:
    """Each token id's text, for every row of the unembedding (ids past the tokenizer read `<id>`).

    A token that is only part of a UTF-8 character decodes to U+FFFD on its own; it reads as its
    bytes instead (`\\xe2\\x80`, or a byte-fallback piece's own `<0xE2>`), so pieces stay distinct.
    """
    tok = model.tokenizer
    d_vocab = int(model.W_U.shape[1])
    n = min(len(tok), d_vocab)
    texts = tok.batch_decode([[i] for i in range(n)])
    for i, text in enumerate(texts):
        if "\ufffd" in text:
            texts[i] = byte_piece(tok.convert_ids_to_tokens(i)) or text
    return texts + [f"<{i}>" for i in range(n, d_vocab)]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()


def byte_piece(piece: str | None) -> str | None:
    """A sub-character token's text from its vocabulary entry: byte-fallback `<0xNN>` as it is, a byte-level
    BPE piece as its bytes with the undecodable ones written `\\xNN`; None for any other entry."""
    if piece is None:
        return None
    if re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", piece):
        return piece
    if all(c in BYTE_LEVEL for c in piece):
        return bytes(BYTE_LEVEL[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return None
