"""One trainer for every SAE variant: Adam, schedules, constraints, dead latents, checkpoints.

`Trainer` works on any `ActivationSource`; `train` is the full run behind `saelab train`
(harvest or reuse the activation cache, train, save, evaluate).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import ActivationCache, ActivationSource
from saelab.config import ConfigError, TrainConfig, from_dict, to_dict
from saelab.models import resolve_device
from saelab.sae import SAE, CheckpointError, load_state

CHECKPOINT = "checkpoint"


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-6) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows of x [N, d] (Weiszfeld's algorithm)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        if (y_next - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_next
        y = y_next
    return y


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
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.device = resolve_device(cfg.device)
        self.sae.to(self.device)
        self.lr = cfg.lr or default_lr(sae.d_sae)
        # One fused kernel per step on CUDA: Adam is then close to its memory-traffic floor.
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.lr, betas=(0.9, 0.999), fused=fused)
        self.total_steps = max(1, int(source.n_tokens * cfg.epochs) // cfg.batch_size)
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=self.device)
        self.autocast = cfg.autocast and self.device.type == "cuda"

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
        log = self._open_log()
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
        finally:
            bar.close()
            log.close()
        self.sae.eval()
        return self.sae

    def _open_log(self) -> Any:
        """metrics.jsonl, cut back to the checkpoint's step so a resumed log has no duplicate lines."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        path.write_text("".join(ln + "\n" for ln in kept))
        return path.open("a")

    def _wandb(self) -> Any:
        if not self.cfg.wandb_project or importlib.util.find_spec("wandb") is None:
            return None
        import wandb

        wandb.init(project=self.cfg.wandb_project, config=to_dict(self.cfg), dir=str(self.out_dir))
        return wandb

    def save_checkpoint(self) -> None:
        """Write a resumable checkpoint atomically (new dir, then swap), so a kill never corrupts it."""
        final = self.out_dir / CHECKPOINT
        tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        self.sae.save(tmp)
        opt_state = self.opt.state_dict()
        tensors = {"tokens_since_fired": self.tokens_since_fired.cpu()}
        for pid, st in opt_state["state"].items():
            tensors |= {f"opt.{pid}.{k}": v.detach().cpu().contiguous() for k, v in st.items()}
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        state = {
            "step": self.step,
            "source": self.source.state_dict(),
            "config": to_dict(self.cfg),
            "opt_param_groups": opt_state["param_groups"],
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Restore from `out_dir/checkpoint` (or the previous one if a kill hit mid-swap); False if none."""
        ckpt = next((p for p in (self.out_dir / CHECKPOINT, self.out_dir / (CHECKPOINT + ".old")) if p.is_dir()), None)
        if ckpt is None:
            return False
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            tensors = load_file(str(ckpt / "trainer_state.safetensors"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt} is truncated or corrupt ({e}); delete it to start over") from e
        saved_cfg = from_dict(TrainConfig, state["config"])
        if to_dict(saved_cfg) != to_dict(self.cfg):
            raise ConfigError(f"{self.out_dir} holds a run with a different config; use another out_dir")
        load_state(self.sae, ckpt / "sae_weights.safetensors")
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["opt_param_groups"]}
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = t.to(self.device) if name != "step" else t
        self.opt.load_state_dict(opt_state)
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        self.step = int(state["step"])
        self.source.load_state_dict(state["source"])
        return True


def _prepend(first: Tensor, rest: Any) -> Any:
    yield first
    yield from rest


def train(cfg: TrainConfig) -> Path:
    """The full run behind `saelab train`: activations -> SAE -> checkpoint dir -> eval.json.

    Activations are harvested once into the cache (`data.cache_dir`, default `<out_dir>/activations`)
    and reused by later runs with the same data config; the model is loaded only if needed.
    """
    from saelab.models import load_model

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = None

    def get_model() -> Any:
        nonlocal model
        if model is None:
            model = load_model(cfg.data.model, cfg.data.device)
        return model

    cache = ActivationCache.open_or_harvest(get_model, cfg.data, cfg.data.cache_dir or out / "activations", cfg.seed)
    sae_cfg = cfg.sae.resolve(int(cache.meta["d_in"]))
    sae_cfg.model_name, sae_cfg.hook_name = cfg.data.model, cfg.data.hook_name
    sae_cfg.exclude_norm_above = cache.threshold
    sae_cfg.n_sources = int(cache.meta.get("n_sources", 1))
    torch.manual_seed(cfg.seed)
    sae = SAE.from_config(sae_cfg)
    (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    Trainer(cfg, sae, cache.source(cfg.seed), out).fit()
    sae.save(out)
    if cfg.eval_tokens:
        from saelab.evals import evaluate_run

        evaluate_run(out, get_model(), cfg.data, cfg.eval_tokens)
    return out
