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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saelab import distributed, formats, sharding
from saelab.activations import ActivationCache, ActivationSource
from saelab.collectives import COMM, all_gather, all_reduce
from saelab.config import TrainConfig, from_dict, to_dict
from saelab.distributed import Mesh, peak_memory_mb
from saelab.errors import CheckpointError, ConfigError, TrainingError
from saelab.evals import evaluate_run
from saelab.files import replacing
from saelab.models import load_model, resolve_device
from saelab.rundir import RunDir
from saelab.sae import SAE, WEIGHTS_FILE, check_state, save_state

DIST_FIELDS = ("latent_shards", "dist_timeout_s")
"""TrainConfig fields that say how a run is spread over ranks, not what it computes: a run resumes with
other values (on another number of ranks) at the same token."""


def default_lr(d_sae: int) -> float:
    """Learning rate scaled with the number of latents, 2e-4 at 16k (Gao et al. 2024)."""
    return 2e-4 / math.sqrt(d_sae / 16384)


class Trainer:
    """Trains `sae` on batches from `source`, checkpointing to `out_dir` and resuming from it.

    A run killed at any point and started again with the same arguments continues from its last
    checkpoint and ends bit-identical (on CPU) to a run that never stopped: parameters, Adam state,
    step, data position and dead-latent counters are all restored.

    With a `mesh` (`saelab.distributed`) this rank trains its part: its latent shard of `sae` (the
    full SAE, identical on every rank) on its replica's part of each global batch of `cfg.batch_size`
    (`source` is that part). Gradients are averaged over replicas, selections and statistics are those
    of the full SAE on the global batch (`saelab.sharding`), and checkpoints hold the full SAE, written
    by rank 0, so a run resumes on any number of ranks at the same token.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        sae: SAE,
        source: ActivationSource,
        out_dir: str | Path | None = None,
        mesh: Mesh | None = None,
    ):
        self.cfg, self.source, self.mesh = cfg, source, mesh
        self.sae_cfg = sae.cfg
        """The full SAE's config (this rank's `sae` may hold a shard of it)."""
        self.groups = mesh.groups if mesh is not None else sharding.Groups()
        if self.groups.n_shards > 1:
            local = SAE.from_config(sharding.shard_config(sae.cfg, self.groups))
            state = sae.state_dict()
            local.load_state_dict(sharding.shard(state, sae.d_sae, self.groups, _axes(state)))
            sae = local
        self.sae = sae
        self.run = RunDir(out_dir or cfg.out_dir)
        self.device = mesh.device if mesh is not None else resolve_device(cfg.device)
        self.sae.to(self.device)
        self.lr = cfg.lr or default_lr(self.sae_cfg.d_sae)
        # One fused kernel per step on CUDA: Adam is then close to its memory-traffic floor.
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.lr, betas=(0.9, 0.999), fused=fused)
        self.total_steps = max(1, int(source.n_tokens * cfg.epochs) // cfg.batch_size)
        self.step = 0
        self.saved_step: int | None = None
        """Step of the last checkpoint written or resumed from (None: none yet)."""
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=self.device)
        self.autocast = cfg.autocast and self.device.type == "cuda"
        sp = self.sae.sparsifier
        # Per-token selections need nothing from other ranks unless the latents are split.
        self.sharded_forward = mesh is not None and (self.groups.n_shards > 1 or (sp.uses_k and not sp.per_token))
        self._since_log = (0.0, 0.0, 0)  # (time, COMM.seconds, step) at the last per-rank report

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (always, without a mesh)."""
        return self.mesh is None or self.mesh.is_main

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
        """Ramp of the sparsity penalty's coefficient (relu's L1, jumprelu's L0): 0 -> 1 over the first
        `l1_warmup_fraction` of steps."""
        ramp = self.cfg.l1_warmup_fraction * self.total_steps
        return 1.0 if ramp < 1 else min(1.0, (step + 1) / ramp)

    @torch.no_grad()
    def initialise(self, rows: Tensor) -> None:
        """Set the input scale (mean norm -> sqrt(d_in)) and b_dec (geometric median) from a sample of rows."""
        x, extra = self.sae.split_rows(rows.to(self.device))
        self.sae.initialise(x, self.cfg.geometric_median_samples, target=extra.get("target"))

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for `dead_after_tokens` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def train_step(self, rows: Tensor) -> dict[str, float]:
        """One optimiser step on a batch of rows (`SAE.split_rows`: inputs, or inputs and targets or
        gradients); returns its metrics."""
        sae = self.sae
        x, extra = sae.split_rows(rows)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        dead, l1_scale = self.dead_mask(), self.l1_scale_at(self.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.sharded_forward:
                out = sharding.forward(sae, x, self.sae_cfg, self.groups, dead, l1_scale)
            else:
                out = sae(x, dead_mask=dead, l1_scale=l1_scale, replicas=self.groups.replicas, **extra)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self._average_gradients()
        if sae.sparsifier.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        self.opt.step()
        if sae.sparsifier.unit_norm_decoder:
            sae.set_decoder_norm_to_unit()
        sae.sparsifier.project()
        fired = out.code.fired(sae.d_sae)
        if self.mesh is not None:
            fired = all_reduce(fired.int(), self.groups.replicas, torch.distributed.ReduceOp.MAX).bool()
        self.tokens_since_fired += self.cfg.batch_size if self.mesh is not None else len(x)
        self.tokens_since_fired[fired] = 0
        self.step += 1
        metrics = self._reduce_metrics({"loss": out.loss, "mse": out.mse, "fvu": out.fvu, "l0": out.l0} | out.aux)
        if not math.isfinite(metrics["loss"]):
            # NaN or infinite input always shows up here (the MSE reads every input value), at no cost
            # to ordinary steps; only then is the batch inspected to tell bad data from divergence.
            bad = int((~torch.isfinite(rows).all(dim=-1)).sum())
            cause = (
                f"{bad} of {len(x)} activation rows of its batch hold NaN or infinite values (check the "
                "activation source: saelab's harvest drops such tokens, arrays passed in are used as they are)"
                if bad
                else f"the loss is {metrics['loss']} (training diverged; try a lower lr)"
            )
            raise TrainingError(f"step {self.step}: {cause}")
        return metrics

    def _average_gradients(self) -> None:
        """Average gradients over the replicas in one all-reduce (each replica saw its part of the batch)."""
        n = self.groups.n_replicas
        if n == 1:
            return
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), self.groups.replicas).div_(n)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def _reduce_metrics(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Metrics as floats, averaged over replicas (so every rank logs and checks the same numbers)."""
        if self.groups.n_replicas == 1:
            return {k: v.item() for k, v in values.items()}
        vec = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        vec = all_reduce(vec, self.groups.replicas).div_(self.groups.n_replicas).tolist()
        return dict(zip(values, vec, strict=True))

    def rank_report(self) -> list[dict[str, float]]:
        """Each rank's tokens/s, seconds in collectives and peak memory since the last report (all ranks call it)."""
        now, comm = time.perf_counter(), COMM.seconds
        then, comm_then, step_then = self._since_log
        self._since_log = (now, comm, self.step)
        tokens = (self.step - step_then) * self.cfg.batch_size / self.groups.n_replicas
        own = torch.tensor([tokens / max(now - then, 1e-9), comm - comm_then, peak_memory_mb(self.device)])
        every = all_gather(own.to(self.device), self.groups.world).cpu().tolist()
        return [{"rank": r, "tokens_per_s": t, "comm_s": c, "peak_mem_mb": m} for r, (t, c, m) in enumerate(every)]

    def fit(self, on_step: Callable[[Trainer, dict[str, float]], None] | None = None) -> SAE:
        """Train to `total_steps`, resuming from `out_dir/checkpoint` if one exists.

        Returns the trained SAE in eval mode: the whole SAE, except on the ranks other than 0 of a
        latent-sharded run, which return their own shard.
        """
        resumed = self.load_checkpoint()
        self.sae.train()
        if not resumed and self.mesh is not None:
            self.initialise(self.source.whole_batch(self.cfg.batch_size))  # type: ignore[attr-defined]
        batches = self.source.batches(self.cfg.batch_size)
        if not resumed and self.mesh is None:
            first = next(batches)
            self.initialise(first)
            batches = _prepend(first, batches)
        log = self.run.open_metrics_log(self.step) if self.is_main else None
        wandb = self._wandb() if self.is_main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.sae.cfg.sparsifier}", unit="step",
                   disable=not self.is_main)  # fmt: skip
        self._since_log = (time.perf_counter(), COMM.seconds, self.step)
        try:
            while self.step < self.total_steps:
                metrics = self.train_step(next(batches).to(self.device, non_blocking=True))
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(metrics, log, bar, wandb)
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
            if log is not None:
                log.close()
        if self.groups.n_shards == 1:
            return self.sae.eval()
        state = self._full_state()
        if not self.is_main:
            return self.sae.eval()
        full = SAE.from_config(self.sae_cfg)
        full.load_state_dict(state)
        return full.eval()

    def _log(self, metrics: dict[str, Any], log: Any, bar: Any, wandb: Any) -> None:
        """One metrics line (rank 0), with every rank's throughput when there are several."""
        metrics |= {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "lr": self.lr_at(self.step - 1),
            "dead_frac": self.dead_mask().float().mean().item(),
        }
        postfix = {"fvu": f"{metrics['fvu']:.3f}", "l0": f"{metrics['l0']:.1f}", "dead": f"{metrics['dead_frac']:.3f}"}
        if self.mesh is not None:
            if self.groups.n_shards > 1:  # each shard counts its own latents
                dead = all_reduce(self.dead_mask().float().sum().reshape(1), self.groups.shards)
                metrics["dead_frac"] = float(dead) / self.sae_cfg.d_sae
                postfix["dead"] = f"{metrics['dead_frac']:.3f}"
            ranks = self.rank_report()
            metrics["ranks"] = ranks
            postfix["tok/s"] = f"{sum(r['tokens_per_s'] for r in ranks) / self.groups.n_shards:.0f}"
            postfix["comm"] = f"{max(r['comm_s'] for r in ranks):.2f}s"
        if log is None:
            return
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        bar.set_postfix(postfix)
        if wandb is not None:
            wandb.log({k: v for k, v in metrics.items() if k != "ranks"}, step=self.step)

    def _wandb(self) -> Any:
        if not self.cfg.wandb_project or importlib.util.find_spec("wandb") is None:
            return None
        import wandb

        wandb.init(project=self.cfg.wandb_project, config=to_dict(self.cfg), dir=str(self.out_dir))
        return wandb

    def _full_state(self) -> dict[str, Tensor]:
        """The full SAE's state dict (gathered from every latent shard: all shard ranks call this)."""
        state = self.sae.state_dict()
        if self.groups.n_shards == 1:
            return state
        axes = _axes(state)
        d = self.sae_cfg.d_sae
        gather = sharding.gather_latents
        return {k: v if axes[k] is None else gather(v, axes[k], d, self.groups) for k, v in state.items()}

    def _opt_axes(self) -> dict[int, int | None]:
        """Latent axis of each parameter (by optimiser id), which its Adam moments share."""
        return {pid: sharding.latent_axis(name, p) for pid, (name, p) in enumerate(self.sae.named_parameters())}

    def save_checkpoint(self) -> None:
        """Write a resumable checkpoint atomically (`saelab.files.replacing`), so a kill never corrupts it.

        Raises `TrainingError` instead of saving when a weight or optimiser state is NaN or infinite.
        With a mesh every rank takes part (the shards are gathered) and rank 0 writes.
        """
        opt_state = self.opt.state_dict()
        tensors = {"tokens_since_fired": self.tokens_since_fired}
        axes = self._opt_axes()
        for pid, st in opt_state["state"].items():
            tensors |= {f"opt.{pid}.{k}": v if k == "step" else v.detach() for k, v in st.items()}
        if self.groups.n_shards > 1:
            d = self.sae_cfg.d_sae
            tensors = {
                k: v if _opt_axis(k, axes) is None else sharding.gather_latents(v, _opt_axis(k, axes), d, self.groups)
                for k, v in tensors.items()
            }
        tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
        state = self._full_state()
        bad = first_nonfinite(state | tensors)
        if bad is not None:
            raise TrainingError(f"step {self.step}: {bad} holds non-finite values")
        if self.is_main:
            meta = {
                "step": self.step,
                "source": self.source.state_dict(),
                "config": to_dict(self.cfg),
                "opt_param_groups": opt_state["param_groups"],
            }
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with replacing(self.run.checkpoint) as tmp:
                save_state(tmp, self.sae_cfg, state)  # the scale kept apart: resuming is exact
                save_file(tensors, str(tmp / RunDir.TRAINER_TENSORS))
                (tmp / RunDir.TRAINER_STATE).write_text(json.dumps(meta, indent=2))
        self.saved_step = self.step

    def load_checkpoint(self) -> bool:
        """Restore from the run's checkpoint (or the previous one if a kill hit mid-swap); False if none.

        A checkpoint holds the full SAE, so each rank of a mesh of any shape takes its own part of it.
        """
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            return False
        try:
            state = json.loads((ckpt / RunDir.TRAINER_STATE).read_text())
            tensors = load_file(str(ckpt / RunDir.TRAINER_TENSORS))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt} is truncated or corrupt ({e}); delete it to start over") from e
        saved_cfg = from_dict(TrainConfig, state["config"])
        if _resume_key(saved_cfg) != _resume_key(self.cfg):
            raise ConfigError(f"{self.out_dir} holds a run with a different config; use another out_dir")
        weights = formats.read_safetensors(ckpt / WEIGHTS_FILE)
        if self.groups.n_shards > 1:
            d = self.sae_cfg.d_sae
            if weights.get("b_enc", torch.empty(0)).shape != (d,):
                raise CheckpointError(f"{ckpt} does not hold an SAE of {d} latents; use another out_dir")
            weights = sharding.shard(weights, d, self.groups, _axes(weights))
            axes = self._opt_axes()
            tensors = sharding.shard(tensors, d, self.groups, {k: _opt_axis(k, axes) for k in tensors})
        check_state(self.sae, weights, ckpt / WEIGHTS_FILE)
        self.sae.load_state_dict(weights)
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


def _axes(state: Mapping[str, Tensor]) -> dict[str, int | None]:
    """Latent axis of each entry of an SAE state dict."""
    return {k: sharding.latent_axis(k, v) for k, v in state.items()}


def _opt_axis(key: str, axes: dict[int, int | None]) -> int | None:
    """Latent axis of a trainer tensor: 'tokens_since_fired' (0) or 'opt.<pid>.<moment>' (its parameter's)."""
    if key == "tokens_since_fired":
        return 0
    _, pid, name = key.split(".", 2)
    return None if name == "step" else axes[int(pid)]


def _resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's config must match to resume it (not how the run is spread over ranks)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in DIST_FIELDS}


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

    Under torchrun every rank runs this: they check that they agree on the config, versions and
    activations, harvest together (each rank its block of the corpus), each trains its part
    (`Trainer`), and rank 0 saves and evaluates. The run directory must be on a filesystem every rank sees (a resumed
    run reads rank 0's checkpoint on every rank).
    """
    mesh = distributed.init(cfg.device, cfg.latent_shards, cfg.dist_timeout_s)
    ok = False
    try:
        out = _train(cfg, mesh)
        ok = True
        return out
    finally:
        distributed.finish(mesh, ok)


def _train(cfg: TrainConfig, mesh: Mesh | None) -> Path:
    run = RunDir(cfg.out_dir)
    distributed.check_agreement(mesh, "run", {"config": to_dict(cfg)})
    run.path.mkdir(parents=True, exist_ok=True)
    get_model = _model_loader(cfg)

    cache = ActivationCache.open_or_harvest(get_model, cfg.data, run.activation_cache(cfg.data), cfg.seed, mesh)
    distributed.check_agreement(mesh, "activation cache", {"cache": cache.meta})
    return _fit_run(cfg, cache, get_model, mesh)


def _model_loader(cfg: TrainConfig) -> Callable[[], Any]:
    """Loads the run's model on first call only (a reused cache never needs it)."""
    model = None

    def get_model() -> Any:
        nonlocal model
        if model is None:
            model = load_model(cfg.data.model, cfg.data.device)
        return model

    return get_model


def _fit_run(cfg: TrainConfig, cache: ActivationCache, get_model: Callable[[], Any], mesh: Mesh | None) -> Path:
    """Train the run's SAE from its activation cache, then save and evaluate it (rank 0)."""
    run = RunDir(cfg.out_dir)
    output = {"d_out": int(cache.meta.get("d_out", 0)), "hook_name_out": cfg.data.hook_name_out}
    sae_cfg = dataclasses.replace(
        dataclasses.replace(cfg.sae, **output).resolve(int(cache.meta["d_in"])),
        model_name=cfg.data.model,
        hook_name=cfg.data.hook_name,
        exclude_norm_above=cache.threshold,
        n_sources=int(cache.meta.get("n_sources", 1)),
    )
    torch.manual_seed(cfg.seed)
    sae = SAE.from_config(sae_cfg)  # the full SAE on every rank, so that shards start as its slices
    part = (0, 1) if mesh is None else (mesh.replica, mesh.groups.n_replicas)
    if mesh is None or mesh.is_main:
        run.write_train_config(cfg)
    sae = Trainer(cfg, sae, cache.source(cfg.seed, part), run.path, mesh).fit()
    if mesh is None or mesh.is_main:
        sae.save(run.path)
        if cfg.eval_tokens:
            evaluate_run(run.path, get_model(), cfg.data, cfg.eval_tokens)
    return run.path


def per_hook(cfg: TrainConfig, hooks: Sequence[str]) -> list[TrainConfig]:
    """One config per hook point, each writing to `<out_dir>/<hook>` (`saelab train --hooks a,b,...`)."""
    if not hooks or len(set(hooks)) != len(hooks):
        raise ConfigError(f"--hooks needs distinct hook points, got {list(hooks)}")
    return [
        dataclasses.replace(
            cfg, out_dir=str(Path(cfg.out_dir) / hook), data=dataclasses.replace(cfg.data, hook_name=hook)
        )
        for hook in hooks
    ]


def train_many(cfgs: Sequence[TrainConfig]) -> list[Path]:
    """Several runs on hook points of one model from one harvest (`saelab train --hooks` or several
    `--config`s): each config may set its own SAE (width, sparsifier, k) and optimisation, and each SAE
    equals the one `train` would give its config alone.

    Under torchrun the runs are spread over the ranks, run i on rank i % world: each rank harvests its
    own hook points in one pass and trains its SAEs whole, with no collectives between ranks while they
    train. Returns the run directories (on every rank, all of them).
    """
    first = cfgs[0]
    outs = [str(Path(c.out_dir).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"each run needs its own out_dir, got {outs}")
    for cfg in cfgs[1:]:
        if cfg.seed != first.seed or cfg.device != first.device or cfg.latent_shards != 1:
            raise ConfigError("runs sharing a harvest need the same seed and device, and latent_shards = 1")
    caches = [RunDir(c.out_dir).activation_cache(c.data).resolve() for c in cfgs]
    if len(set(caches)) != len(caches):
        raise ConfigError("runs sharing a harvest write one cache each: give them distinct data.cache_dir values")
    mesh = distributed.init(first.device, 1, first.dist_timeout_s)
    ok = False
    try:
        distributed.check_agreement(mesh, "runs", {"configs": [to_dict(c) for c in cfgs]})
        mine = [i for i in range(len(cfgs)) if mesh is None or i % mesh.world == mesh.rank]
        if mine:
            get_model = _model_loader(first)
            made = ActivationCache.open_or_harvest_many(
                get_model, [cfgs[i].data for i in mine], [caches[i] for i in mine], first.seed
            )
            for i, cache in zip(mine, made, strict=True):
                RunDir(cfgs[i].out_dir).path.mkdir(parents=True, exist_ok=True)
                _fit_run(cfgs[i], cache, get_model, None)
        ok = True
    finally:
        distributed.finish(mesh, ok)
    return [Path(c.out_dir) for c in cfgs]
