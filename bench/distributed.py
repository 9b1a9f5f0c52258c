"""Scaling out, measured on this machine: one harvest for many hook points, and 2-rank training.

1. Many hook points: harvesting activations at several layers of one model in one pass
   (`ActivationCache.harvest_many`, what `saelab train --hooks` does) against one harvest per layer
   (what separate runs do). Training afterwards is the same work either way, so the harvest is
   what differs.
2. Two ranks on CPU (gloo): training-step throughput of one SAE shape as one process (1 and 2
   threads), data-parallel on 2 ranks, and latent-sharded on 2 ranks (1 thread each). Scaling
   efficiency = 2-rank tokens/s / (2 x one process with 1 thread).

    python bench/distributed.py                      # SmolLM2-135M (offline default), layers 3, 6, 9, 12
    python bench/distributed.py --model DIR --hooks blocks.0.hook_resid_post,blocks.1.hook_resid_post \\
        --tokens 2048 --shape 32,128,4 --batch 256 --steps 6 --no-save    # toy sizes (the test)

Results go to bench/results/distributed-cpu-<commit>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save_results

DEFAULT_HOOKS = ",".join(f"blocks.{i}.hook_resid_post" for i in (3, 6, 9, 12))


def many_hooks(model_name: str, hooks: list[str], tokens: int) -> list[dict]:
    """Harvest time for all hooks in one pass and one pass per hook."""
    from saelab.activations import ActivationCache
    from saelab.config import DataConfig
    from saelab.models import load_model

    model = load_model(model_name, "cpu")
    cfgs = [DataConfig(model=model_name, hook_name=h, n_tokens=tokens, device="cpu") for h in hooks]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ActivationCache.harvest(model, cfgs[0], Path(tmp) / "warm")  # tokenise and warm the model up once
        t0 = time.perf_counter()
        ActivationCache.harvest_many(model, cfgs, [Path(tmp) / f"one-{i}" for i in range(len(cfgs))])
        one_pass = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, cfg in enumerate(cfgs):
            ActivationCache.harvest(model, cfg, Path(tmp) / f"each-{i}")
        each = time.perf_counter() - t0
    for name, seconds in (("one pass for all hooks", one_pass), ("one pass per hook", each)):
        rows.append({"mode": name, "seconds": seconds, "tokens_per_s": tokens * len(hooks) / seconds})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(world: int, threads: int, args: list[str]) -> dict:
    """Run the training worker on `world` ranks; rank 0's measurement."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        env.pop("WORLD_SIZE", None)
        if world > 1:
            env |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", *args, "--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a training worker failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(outs[0].strip().splitlines()[-1])


def worker(shape: tuple[int, int, int], batch: int, steps: int, shards: int, threads: int) -> None:
    """One rank: train on random activations, time the steps after a warm-up, print rank 0's numbers."""
    from saelab import distributed
    from saelab.activations import ArrayActivations
    from saelab.collectives import COMM
    from saelab.config import SAEConfig, TrainConfig
    from saelab.sae import SAE
    from saelab.trainer import Trainer

    torch.set_num_threads(threads)
    d_in, d_sae, k = shape
    mesh = distributed.init("cpu", shards)
    warm = max(1, steps // 5)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(batch_size=batch, epochs=1.0, checkpoint_every=0, log_every=10**9, device="cpu",
                          out_dir=tmp, latent_shards=shards, warmup_steps=1, geometric_median_samples=0)  # fmt: skip
        torch.manual_seed(0)
        x = torch.randn(batch * steps, d_in)
        part = (0, 1) if mesh is None else (mesh.replica, mesh.groups.n_replicas)
        marks: dict[str, float] = {}

        def on_step(trainer: Trainer, metrics: dict) -> None:  # the steps after the warm-up, not the final save
            if trainer.step in (warm, trainer.total_steps):
                marks.update({f"t{trainer.step}": time.perf_counter(), f"comm{trainer.step}": COMM.seconds})

        sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        Trainer(cfg, sae, ArrayActivations(x, part=part), tmp, mesh).fit(on_step)
        elapsed = marks[f"t{steps}"] - marks[f"t{warm}"]
        comm = marks[f"comm{steps}"] - marks[f"comm{warm}"]
    distributed.finish(mesh)
    if mesh is None or mesh.is_main:
        tok_s = (steps - warm) * batch / elapsed
        print(
            json.dumps(
                {"tokens_per_s": tok_s, "ms_per_step": 1e3 * elapsed / (steps - warm), "comm_frac": comm / elapsed}
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hooks", default=DEFAULT_HOOKS)
    p.add_argument("--tokens", type=int, default=16_384, help="tokens harvested per hook")
    p.add_argument("--shape", default="576,4608,32", help="d_in,d_sae,k of the trained SAE")
    p.add_argument("--batch", default="1024,4096", help="global batch sizes (comma-separated)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.worker:
        worker(shape, int(args.batch), args.steps, args.shards, args.threads)  # type: ignore[arg-type]
        return

    hooks = args.hooks.split(",")
    harvest = many_hooks(args.model, hooks, args.tokens)
    runs = [
        ("1 process, 1 thread", 1, 1, 1),
        ("1 process, 2 threads", 1, 2, 1),
        ("data-parallel, 2 ranks x 1 thread", 2, 1, 1),
        ("latent-sharded, 2 ranks x 1 thread", 2, 1, 2),
    ]
    training = []
    for batch in args.batch.split(","):
        common = ["--shape", args.shape, "--batch", batch, "--steps", str(args.steps)]
        for name, world, threads, shards in runs:
            r = _ranks(world, threads, [*common, "--shards", str(shards)])
            training.append({"mode": name, "world": world, "batch": int(batch), **r})
    lines = [
        f"# Scaling out on CPU ({os.cpu_count()} cores, torch {torch.__version__})",
        "",
        f"## Many hook points: {args.model}, {len(hooks)} hooks ({', '.join(hooks)}), {args.tokens} tokens each",
        "",
        "| harvest | seconds | hook-tokens/s |",
        "|---|---|---|",
        *(f"| {r['mode']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} |" for r in harvest),
        "",
        f"One pass / one per hook: **{harvest[1]['seconds'] / harvest[0]['seconds']:.2f}x** the throughput.",
        "",
        f"## Training one SAE {shape[0]} x {shape[1]}, k {shape[2]}, gloo",
        "",
        "| global batch | mode | tokens/s | ms/step | time in collectives | scaling efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in training:
        base = next(b["tokens_per_s"] for b in training if b["batch"] == r["batch"])  # 1 process, 1 thread
        eff = f"{r['tokens_per_s'] / (r['world'] * base):.2f}" if r["world"] > 1 else ""
        lines.append(
            f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} | "
            f"{100 * r['comm_frac']:.0f}% | {eff} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_save:
        print(f"saved {save_results('distributed', 'cpu', table, {'harvest': harvest, 'training': training})}")


if __name__ == "__main__":
    main()
