"""One trainer for every SAE variant: Adam, schedules, constraints, dead latents, checkpoints.

`Trainer` works on any `ActivationSource`; `train` is the full run behind `saelab train`
(harvest or reuse the activation cache, train, save, evaluate).

A run never saves non-finite state: a batch of NaN / infinite activations or a diverged loss stops
it at that step, and a NaN or infinite weight stops it before the checkpoint that would hold it, so
the last checkpoint on disk is always a good one to resume or inspect.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import ActivationCache, ActivationSource
from saelab.config import TrainConfig, from_dict, to_dict
from saelab.errors import CheckpointError, ConfigError, TrainingError
from saelab.evals import evaluate_run
from saelab.files import replacing
from saelab.models import load_model, resolve_device
from saelab.rundir import RunDir
from saelab.sae import SAE, WEIGHTS_FILE, load_state


def default_lr(d_sae: int) -> float:
    """Learning rate scaled with the number of latents, 2e-4 at 16k (Gao et al. 2024)."""
    return 2e-4 / math.sqrt(d_sae / 16384)


class Trainer:
    """Trains `sae` on batches from `source`, checkpointing to `out_dir` and resuming from it.

    A run killed at any point and started again with the same arguments continues from its last
    checkpoint and ends bit-identical (on CPU) to a run that never stopped: parameters, Adam state,
    step, data position and dead-latent counters are all restored.
    """

    def __init__(self, cfg: TrainConfig, sae: SAE, source: ActivationSource, out_dir: str | Path | None = None):
        self.cfg, self.sae, self.source = cfg, sae, source
        self.run = RunDir(out_dir or cfg.out_dir)
        self.device = resolve_device(cfg.device)
        self.sae.to(self.device)
        self.lr = cfg.lr or default_lr(sae.d_sae)
        # One fused kernel per step on CUDA: Adam is then close to its memory-traffic floor.
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.lr, betas=(0.9, 0.999), fused=fused)
        self.total_steps = max(1, int(source.n_tokens * cfg.epochs) // cfg.batch_size)
        self.step = 0
        self.saved_step: int | None = None
        """Step of the last checkpoint written or resumed from (None: none yet)."""
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=self.device)
        self.autocast = cfg.autocast and self.device.type == "cuda"

    @property
    def out_dir(self) -> Path:
        """The run directory."""
        return self.run.path

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to 0 over the last `decay_fraction` of steps."""
        warm = min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        decay_start = int(self.total_steps * (1 - self.cfg.decay_fraction))
        decay = 1.0 if step < decay_start else (self.total_steps - step) / max(1, self.total_steps - decay_start)
        return self.lr * warm * decay

    def l1_scale_at(self, step: int) -> float:
        """Ramp of the L1 coefficient (relu): 0 -> 1 over the first `l1_warmup_fraction` of steps."""
        ramp = self.cfg.l1_warmup_fraction * self.total_steps
        return 1.0 if ramp < 1 else min(1.0, (step + 1) / ramp)

    @torch.no_grad()
    def initialise(self, x: Tensor) -> None:
        """Set the input scale (mean norm -> sqrt(d_in)) and b_dec (geometric median) from a sample."""
        self.sae.initialise(x.to(self.device), self.cfg.geometric_median_samples)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for `dead_after_tokens` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def train_step(self, x: Tensor) -> dict[str, float]:
        """One optimiser step on a batch; returns its metrics."""
        sae = self.sae
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = sae(x, dead_mask=self.dead_mask(), l1_scale=self.l1_scale_at(self.step))
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if sae.sparsifier.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        self.opt.step()
        if sae.sparsifier.unit_norm_decoder:
            sae.set_decoder_norm_to_unit()
        self.tokens_since_fired += len(x)
        self.tokens_since_fired[out.code.fired(sae.d_sae)] = 0
        self.step += 1
        metrics = {"loss": out.loss.item(), "mse": out.mse.item(), "fvu": out.fvu.item(), "l0": out.l0.item()}
        if not math.isfinite(metrics["loss"]):
            # NaN or infinite input always shows up here (the MSE reads every input value), at no cost
            # to ordinary steps; only then is the batch inspected to tell bad data from divergence.
            bad = int((~torch.isfinite(x).all(dim=-1)).sum())
            cause = (
                f"{bad} of {len(x)} activation rows of its batch hold NaN or infinite values (check the "
                "activation source: saelab's harvest drops such tokens, arrays passed in are used as they are)"
                if bad
                else f"the loss is {metrics['loss']} (training diverged; try a lower lr)"
            )
            raise TrainingError(f"step {self.step}: {cause}")
        metrics |= {k: v.item() for k, v in out.aux.items()}
        return metrics

    def fit(self, on_step: Callable[[Trainer, dict[str, float]], None] | None = None) -> SAE:
        """Train to `total_steps`, resuming from `out_dir/checkpoint` if one exists."""
        resumed = self.load_checkpoint()
        self.sae.train()
        batches = self.source.batches(self.cfg.batch_size)
        if not resumed:
            first = next(batches)
            self.initialise(first)
            batches = _prepend(first, batches)
        log = self.run.open_metrics_log(self.step)
        wandb = self._wandb()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.sae.cfg.sparsifier}", unit="step")
        try:
            while self.step < self.total_steps:
                metrics = self.train_step(next(batches).to(self.device, non_blocking=True))
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    metrics |= {
                        "step": self.step,
                        "tokens": self.step * self.cfg.batch_size,
                        "lr": self.lr_at(self.step - 1),
                        "dead_frac": self.dead_mask().float().mean().item(),
                    }
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                    bar.set_postfix(
                        fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead_frac']:.3f}"
                    )
                    if wandb is not None:
                        wandb.log(metrics, step=self.step)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self, metrics)
            if not self.cfg.checkpoint_every or self.step % self.cfg.checkpoint_every:
                self.save_checkpoint()  # a finished run restarts as a no-op
        except TrainingError as e:
            kept = f"{self.run.checkpoint} (step {self.saved_step}) is the last good state"
            if self.saved_step is None:
                kept = "no checkpoint was written"
            raise TrainingError(f"{e}. The run stopped without saving: {kept}") from None
        finally:
            bar.close()
            log.close()
        self.sae.eval()
        return self.sae

    def _wandb(self) -> Any:
        if not self.cfg.wandb_project or importlib.util.find_spec("wandb") is None:
            return None
        import wandb

        wandb.init(project=self.cfg.wandb_project, config=to_dict(self.cfg), dir=str(self.out_dir))
        return wandb

    def save_checkpoint(self) -> None:
        """Write a resumable checkpoint atomically (`saelab.files.replacing`), so a kill never corrupts it.

        Raises `TrainingError` instead of saving when a weight or optimiser state is NaN or infinite.
        """
        opt_state = self.opt.state_dict()
        tensors = {"tokens_since_fired": self.tokens_since_fired.cpu()}
        for pid, st in opt_state["state"].items():
            tensors |= {f"opt.{pid}.{k}": v.detach().cpu().contiguous() for k, v in st.items()}
        bad = first_nonfinite(self.sae.state_dict() | tensors)
        if bad is not None:
            raise TrainingError(f"step {self.step}: {bad} holds non-finite values")
        state = {
            "step": self.step,
            "source": self.source.state_dict(),
            "config": to_dict(self.cfg),
            "opt_param_groups": opt_state["param_groups"],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with replacing(self.run.checkpoint) as tmp:
            self.sae.save(tmp, portable=False)  # the scale kept apart: resuming is exact
            save_file(tensors, str(tmp / RunDir.TRAINER_TENSORS))
            (tmp / RunDir.TRAINER_STATE).write_text(json.dumps(state, indent=2))
        self.saved_step = self.step

    def load_checkpoint(self) -> bool:
        """Restore from the run's checkpoint (or the previous one if a kill hit mid-swap); False if none."""
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            return False
        try:
            state = json.loads((ckpt / RunDir.TRAINER_STATE).read_text())
            tensors = load_file(str(ckpt / RunDir.TRAINER_TENSORS))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt} is truncated or corrupt ({e}); delete it to start over") from e
        saved_cfg = from_dict(TrainConfig, state["config"])
        if to_dict(saved_cfg) != to_dict(self.cfg):
            raise ConfigError(f"{self.out_dir} holds a run with a different config; use another out_dir")
        load_state(self.sae, ckpt / WEIGHTS_FILE)
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["opt_param_groups"]}
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = t.to(self.device) if name != "step" else t
        self.opt.load_state_dict(opt_state)
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        self.step = self.saved_step = int(state["step"])
        self.source.load_state_dict(state["source"])
        return True


def first_nonfinite(tensors: Mapping[str, Tensor]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an infinity, or None."""
    return next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def _prepend(first: Tensor, rest: Any) -> Any:
    yield first
    yield from rest


def train(cfg: TrainConfig) -> Path:
    """The full run behind `saelab train`: activations -> SAE -> run directory -> eval.json.

    Activations are harvested once into the cache (`data.cache_dir`, default `<out_dir>/activations`)
    and reused by later runs with the same data config; the model is loaded only if needed.
    """
    run = RunDir(cfg.out_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    model = None

    def get_model() -> Any:
        nonlocal model
        if model is None:
            model = load_model(cfg.data.model, cfg.data.device)
        return model

    cache = ActivationCache.open_or_harvest(get_model, cfg.data, run.activation_cache(cfg.data), cfg.seed)
    sae_cfg = dataclasses.replace(
        cfg.sae.resolve(int(cache.meta["d_in"])),
        model_name=cfg.data.model,
        hook_name=cfg.data.hook_name,
        exclude_norm_above=cache.threshold,
        n_sources=int(cache.meta.get("n_sources", 1)),
    )
    torch.manual_seed(cfg.seed)
    sae = SAE.from_config(sae_cfg)
    run.write_train_config(cfg)
    Trainer(cfg, sae, cache.source(cfg.seed), run.path).fit()
    sae.save(run.path)
    if cfg.eval_tokens:
        evaluate_run(run.path, get_model(), cfg.data, cfg.eval_tokens)
    return run.path
