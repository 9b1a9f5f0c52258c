"""Train a small SAE on synthetic data in this process; optionally SIGKILL itself at a given step.

Usage: python resume_worker.py OUT_DIR KILL_AT_STEP (0 = never)
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from synthetic import sparse_dictionary_data

from saelab import SAE, SAEConfig, TrainConfig
from saelab.activations import ArrayActivations
from saelab.trainer import Trainer


def main(out_dir: str, kill_at: int) -> None:
    torch.manual_seed(0)
    x, _ = sparse_dictionary_data(6_000, 16, 24, p_active=0.1)
    cfg = TrainConfig(
        out_dir=out_dir,
        batch_size=256,
        epochs=1.5,
        lr=3e-3,
        warmup_steps=5,
        checkpoint_every=5,
        log_every=1,
        dead_after_tokens=1_000,
        geometric_median_samples=256,
    )
    sae = SAE(SAEConfig(d_in=16, d_sae=48, sparsifier="batchtopk", k=3))

    def maybe_die(trainer: Trainer, metrics: dict) -> None:
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(cfg, sae, ArrayActivations(x, seed=1)).fit(on_step=maybe_die)
    sae.save(os.path.join(out_dir, "final"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
