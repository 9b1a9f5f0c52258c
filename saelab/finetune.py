"""A short causal-LM fine-tune, so a base model and a fine-tuned variant can be diffed offline.

`saelab finetune --base smollm2-135m --dataset kjv --steps 200 --out runs/smollm2-kjv` continues
training the base model on another corpus (the King James bible ships offline) and saves a
Hugging Face directory that `load_model` reads like any other. The tokenizer is copied unchanged,
so base and fine-tune can feed one crosscoder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.config import DataConfig
from saelab.corpus import token_sequences
from saelab.errors import ConfigError, DataError
from saelab.files import replacing
from saelab.models import OFFLINE_DEFAULT, TextTokenizer, offline_default_dir


def finetune(
    base: str,
    dataset: str,
    out_dir: str | Path,
    steps: int = 200,
    batch_size: int = 8,
    context_size: int = 128,
    lr: float = 5e-5,
    warmup_steps: int = 20,
    seed: int = 0,
) -> Path:
    """Fine-tune `base` (hub name, local HF dir or the offline default) on `dataset`; returns `out_dir`.

    AdamW with linear warm-up then cosine decay, fp32 on CPU (bf16 autocast on GPU). The model is
    written to `out_dir` only when training finishes (`saelab.files.replacing`), so a killed run
    leaves nothing that looks complete. `finetune.json` records the settings and the loss curve.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1 or batch_size < 1 or context_size < 2:
        raise ConfigError(
            f"need steps >= 1, batch_size >= 1, context_size >= 2 (got {steps}, {batch_size}, {context_size})"
        )
    source = str(offline_default_dir()) if base == OFFLINE_DEFAULT else base
    out = Path(out_dir)
    torch.manual_seed(seed)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:  # unknown names, unsupported architectures, no hub, missing files
        raise DataError(f"cannot load model {base!r}: {e}") from e
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    data = DataConfig(model=base, dataset=dataset, context_size=context_size)
    seqs = token_sequences(TextTokenizer(tok), data, "train", steps * batch_size * context_size, seed)
    if len(seqs) < batch_size:
        raise DataError(f"{dataset!r} gave only {len(seqs)} sequences of {context_size} tokens; need {batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    warm = min(warmup_steps, max(1, steps // 5))  # short runs still spend most steps at full rate

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"finetune on {dataset}", unit="step")
    for step in bar:
        start = (step * batch_size) % (len(seqs) - batch_size + 1)
        batch = seqs[start : start + batch_size].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    record = {
        "base": base,
        "dataset": dataset,
        "steps": steps,
        "batch_size": batch_size,
        "context_size": context_size,
        "lr": lr,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "loss": losses,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(record, indent=2))
    return out
