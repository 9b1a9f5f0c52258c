"""One rank of a distributed test, started by tests/test_distributed.py as torchrun would start it
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment).

Usage: python dist_worker.py SCENARIO SPEC_JSON

- forward: the sharded training pass of each SAE in spec["saes"] against the full SAE on the whole
  batch: reconstruction, losses and (replica-averaged, gathered) gradients must match.
- train: `Trainer.fit` on synthetic data with this rank's mesh; rank 0 saves the final state
  (`spec["stop_at"]` stops every rank after that step, its checkpoint written).
- mismatch: like train, but rank 1 uses another k.
- die: rank 1 exits abruptly at step 2; the others must fail, not hang.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from synthetic import sparse_dictionary_data

from saelab import SAE, SAEConfig, TrainConfig, distributed, sharding
from saelab.activations import ArrayActivations
from saelab.config import from_dict
from saelab.trainer import Trainer


class StopRunError(Exception):
    """Ends a run early (after its checkpoint), as a kill would."""


def data(spec: dict) -> torch.Tensor:
    """Planted activations; a transcoder's rows add a target, a gsae's a stand-in gradient (`SAE.split_rows`)."""
    torch.manual_seed(spec.get("data_seed", 0))
    x = sparse_dictionary_data(spec.get("n", 4096), spec["sae"]["d_in"], 24, p_active=0.1)[0]
    if spec["sae"].get("d_out"):
        return torch.cat([x, torch.tanh(x.roll(1, dims=1))], dim=1)
    if spec["sae"]["sparsifier"] == "gsae":
        return torch.cat([x, torch.sin(3 * x)], dim=1)
    return x


def forward(spec: dict, mesh: distributed.Mesh) -> None:
    g = mesh.groups
    for case in spec["saes"]:
        cfg = SAEConfig(**case["sae"])
        torch.manual_seed(0)
        full = SAE.from_config(cfg)
        x = torch.randn(case.get("batch", 64), cfg.d_in * cfg.n_sources)
        with torch.no_grad():
            full.b_dec.normal_()
            full.b_enc.add_(torch.tensor(case.get("b_enc", [0.0] * cfg.d_sae)))
        dead = torch.tensor(case["dead"]) if "dead" in case else None
        full.train()
        before = {k: v.clone() for k, v in full.state_dict().items()}  # the forward updates firing statistics
        ref = full(x, dead_mask=dead)
        ref.loss.backward()
        local = SAE.from_config(sharding.shard_config(cfg, g))
        axes = {k: sharding.latent_axis(k, v) for k, v in before.items()}
        local.load_state_dict(sharding.shard(before, cfg.d_sae, g, axes))
        local.train()
        n = len(x) // g.n_replicas
        part = x[mesh.replica * n : (mesh.replica + 1) * n]
        lo, hi = sharding.latent_range(cfg.d_sae, g.shard, g.n_shards)
        out = sharding.forward(local, part, cfg, g, dead[lo:hi] if dead is not None else None)
        out.loss.backward()
        what = case["sae"]["sparsifier"]
        torch.testing.assert_close(out.recon, ref.recon[mesh.replica * n : (mesh.replica + 1) * n], msg=what)
        if g.n_replicas == 1:
            torch.testing.assert_close(out.loss, ref.loss, msg=what)
            torch.testing.assert_close(out.l0, ref.l0, msg=what)
            for key, value in ref.aux.items():
                torch.testing.assert_close(out.aux[key], value, msg=f"{what} {key}")
        for name, buf in local.sparsifier.state_dict().items():  # thresholds and firing rates, as observed
            axis = sharding.latent_axis(f"sparsifier.{name}", buf)
            buf = buf if axis is None else sharding.gather_latents(buf, axis, cfg.d_sae, g)
            torch.testing.assert_close(buf, full.sparsifier.state_dict()[name], msg=f"{what} {name}")
        for name, p in local.named_parameters():
            grad = sharding.all_reduce(p.grad.clone(), g.replicas).div_(g.n_replicas)
            axis = sharding.latent_axis(name, p)
            if axis is not None:
                grad = sharding.gather_latents(grad, axis, cfg.d_sae, g)
            want = dict(full.named_parameters())[name].grad
            torch.testing.assert_close(grad, want, msg=f"{what} {name}")
    print(f"rank {mesh.rank}: forward ok", flush=True)


def train(spec: dict, mesh: distributed.Mesh | None, k: int | None = None) -> None:
    x = data(spec)
    cfg = from_dict(TrainConfig, spec["train"])
    sae_cfg = SAEConfig(**(spec["sae"] | ({"k": k} if k else {})))
    if mesh is not None:
        distributed.check_agreement(mesh, "run", {"sae": vars(sae_cfg)})
    torch.manual_seed(0)
    sae = SAE.from_config(sae_cfg)
    part = (0, 1) if mesh is None else (mesh.replica, mesh.groups.n_replicas)

    def on_step(trainer: Trainer, metrics: dict) -> None:
        if spec.get("die_at") and trainer.step == spec["die_at"] and mesh is not None and mesh.rank == 1:
            os._exit(3)
        if trainer.step == spec.get("stop_at"):
            raise StopRunError

    try:
        sae = Trainer(cfg, sae, ArrayActivations(x, seed=1, part=part), cfg.out_dir, mesh).fit(on_step)
    except StopRunError:
        return
    if mesh is None or mesh.is_main:
        save_file(
            {k: v.contiguous() for k, v in sae.state_dict().items()}, os.path.join(cfg.out_dir, "final.safetensors")
        )


def main(scenario: str, spec: dict) -> None:
    mesh = distributed.init("cpu", spec.get("latent_shards", 1), spec.get("timeout", 60))
    ok = False
    try:
        if scenario == "forward":
            forward(spec, mesh)
        elif scenario == "mismatch":
            train(spec, mesh, k=spec["sae"]["k"] + (mesh.rank if mesh else 0))
        else:
            train(spec, mesh)
        ok = True
    finally:
        distributed.finish(mesh, ok)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
