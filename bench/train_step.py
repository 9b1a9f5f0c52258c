"""Training-step throughput and peak memory of TopK SAEs: saelab (triton, torch), sparsify, SAELens; and of
every saelab variant (`--variants`).

One full step = forward, backward, decoder-gradient projection, Adam, decoder renormalisation, on
the same random activations for every implementation. Each (implementation, shape, batch) runs in
its own subprocess so peak memory is its own; SAELens runs in this interpreter when it
imports here, else in a virtual environment this script creates (`bench/.venv-saelens`), because
SAELens 6 needs transformer-lens<4.

    python bench/train_step.py            # GPU shapes on CUDA, small shapes on CPU
    python bench/train_step.py --cpu      # force the CPU shapes
    python bench/train_step.py --no-saelens
    python bench/train_step.py --shapes 2304,65536,64 --batches 16384
    python bench/train_step.py --profile saelab-triton 2304 65536 64 16384   # top kernels of one step
    python bench/train_step.py --variants  # one row per sparsifier, transcoder and skip transcoder

`--variants` times saelab's own step for each variant at one shape: the torch backend, and on a GPU also
Triton for the per-token top-k variants (topk, abstopk). A gsae's batch carries the LM loss's gradient and
a transcoder's its target (random here, as the activations are), so their rows are twice as wide.

Roofline: the least time any step can take is one encoder GEMM at the device's peak matmul rate
plus Adam's memory traffic (7 fp32 reads/writes per parameter) at its peak copy bandwidth; both
peaks are measured here, on this device. The table reports measured time / that bound as a fraction.
Results go to bench/results/train_step-<device>-<commit>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ROOT, save_results

GPU_SHAPES = [(768, 24576, 32), (2304, 65536, 64), (4096, 131072, 64)]
GPU_BATCHES = [4096, 16384]
CPU_SHAPES = [(256, 4096, 32), (576, 4608, 32)]
CPU_BATCHES = [1024, 4096]
SAELENS_VENV = Path(os.environ.get("SAELENS_VENV", ROOT / "bench" / ".venv-saelens"))


# ----------------------------------------------------------------------------- workers
TRANSCODERS = {"transcoder": False, "skip_transcoder": True}
"""`--variants` rows that are transcoders (TopK), and whether each has a skip connection."""


def _saelab_step(d_in: int, d_sae: int, k: int, backend: str, device: str, variant: str = "topk"):
    from saelab import SAE, SAEConfig, TrainConfig
    from saelab.activations import ArrayActivations
    from saelab.trainer import Trainer

    shape = {}
    if variant in TRANSCODERS:
        shape = {"d_out": d_in, "hook_name_out": "out", "skip_connection": TRANSCODERS[variant]}
    sparsifier = "topk" if variant in TRANSCODERS else variant
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, sparsifier=sparsifier, k=k, backend=backend, **shape))
    cfg = TrainConfig(device=device, lr=1e-4, warmup_steps=1, checkpoint_every=0, out_dir="/tmp/saelab-bench")
    trainer = Trainer(cfg, sae, ArrayActivations(torch.zeros(1, d_in)))
    return trainer.train_step


def _sparsify_step(d_in: int, d_sae: int, k: int, device: str):
    if device == "cpu":  # sparsify picks its Triton decoder whenever Triton imports, even for CPU tensors
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:  # sparsify's Trainer step, with Adam for a like-for-like optimiser
        out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def _saelens_step(d_in: int, d_sae: int, k: int, device: str):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(d_sae, device=device)

    def step(x: torch.Tensor) -> None:  # what SAELens's SAETrainer._train_step does per batch
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=since_fired > 1e9,
                           n_training_steps=0, is_logging_step=False)
        )  # fmt: skip
        with torch.no_grad():
            since_fired.add_(1)
            since_fired[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def _make_step(impl: str, d_in: int, d_sae: int, k: int, batch: int) -> tuple[Callable, torch.Tensor, str]:
    """(one training step of `impl`, its batch, the device)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    width = d_in
    if impl.startswith("variant:"):  # variant:<name>:<backend>
        _, variant, backend = impl.split(":")
        step = _saelab_step(d_in, d_sae, k, backend, device, variant)
        width = 2 * d_in if variant == "gsae" or variant in TRANSCODERS else d_in
    elif impl.startswith("saelab-"):
        step = _saelab_step(d_in, d_sae, k, impl.removeprefix("saelab-"), device)
    elif impl == "sparsify":
        step = _sparsify_step(d_in, d_sae, k, device)
    elif impl == "saelens":
        step = _saelens_step(d_in, d_sae, k, device)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1)).to(device)
    return step, x, device


def worker(impl: str, d_in: int, d_sae: int, k: int, batch: int, steps: int) -> dict:
    """Time `steps` training steps after 2 warm-up steps; returns tokens/s and peak memory."""
    step, x, device = _make_step(impl, d_in, d_sae, k, batch)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step(x)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(x)
    sync()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # process high-water RSS (Linux reports KiB); includes the interpreter's baseline
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": batch * steps / elapsed, "step_s": elapsed / steps, "peak_bytes": peak}


def device_peaks() -> dict:
    """Measured peak matmul FLOP/s (fp32, and bf16 on GPU) and copy bandwidth of this device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 8192 if device == "cuda" else 2048
    out = {}
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        a = torch.randn(n, n, device=device, dtype=dtype)
        a @ a
        sync()
        t = time.perf_counter()
        reps = 10 if device == "cuda" else 3
        for _ in range(reps):
            a @ a
        sync()
        out[f"flops_{str(dtype).removeprefix('torch.')}"] = 2 * n**3 * reps / (time.perf_counter() - t)
    buf = torch.empty(2**28 if device == "cuda" else 2**26, device=device)
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(buf)
    sync()
    out["bytes_per_s"] = 2 * buf.numel() * 4 * 5 / (time.perf_counter() - t)
    return out


def roofline_s(d_in: int, d_sae: int, batch: int, peaks: dict) -> float:
    """Lower bound on a step: one encoder GEMM at peak matmul rate + Adam's traffic at peak bandwidth."""
    flops = peaks.get("flops_bfloat16", peaks["flops_float32"])  # saelab trains in bf16 autocast on GPU
    params = 2 * d_in * d_sae + d_sae + d_in
    return 2 * batch * d_in * d_sae / flops + 7 * 4 * params / peaks["bytes_per_s"]


# ----------------------------------------------------------------------------- orchestration
def saelens_python() -> Path | None:
    """A Python that imports sae-lens: this one if it can, else a venv (created on first use); None if neither."""
    probe = subprocess.run([sys.executable, "-c", "import sae_lens"], capture_output=True)
    if probe.returncode == 0:
        return Path(sys.executable)
    python = SAELENS_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {SAELENS_VENV} for sae-lens (once) ...", file=sys.stderr)
        steps = [[sys.executable, "-m", "venv", str(SAELENS_VENV)],
                 [str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
                 [str(python), "-m", "pip", "install", "-q", "sae-lens"]]  # fmt: skip
        for cmd in steps:
            if subprocess.run(cmd).returncode != 0:
                return None
    return python


def _env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (workers import saelab from the tree)."""
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def profile(impl: str, d_in: int, d_sae: int, k: int, batch: int) -> None:
    """Print the CUDA kernels (or CPU ops) that take the time of 3 steps of one implementation."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, x, device = _make_step(impl, d_in, d_sae, k, batch)
    for _ in range(2):
        step(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step(x)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))


def run_one(python: str, impl: str, shape: tuple[int, int, int], batch: int, steps: int) -> dict:
    cmd = [python, __file__, "--worker", impl, *map(str, shape), str(batch), str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark grid and print/save one table with ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU shapes even if a GPU is present")
    parser.add_argument("--no-saelens", action="store_true", help="skip SAELens (no venv creation)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (default 20 GPU / 5 CPU)")
    parser.add_argument("--shapes", nargs="+", help="d_in,d_sae,k triples to run (default: the device's grid)")
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes to run (default: the device's)")
    parser.add_argument("--profile", nargs=5, metavar=("IMPL", "D_IN", "D_SAE", "K", "BATCH"),
                        help="profile 3 steps of one implementation instead of benchmarking")  # fmt: skip
    parser.add_argument("--part", default="", help="suffix for the results file of a partial grid (see --merge)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine partial runs (one device) into one table; rows keep their rooflines")  # fmt: skip
    parser.add_argument("--variants", action="store_true", help="one row per saelab variant at one shape")
    parser.add_argument("--no-save", action="store_true", help="--variants: print the table only")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, *nums = args.worker
        print(json.dumps(worker(impl, *map(int, nums))))
        return
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        if len({r["device"] for r in runs}) != 1:
            parser.error("--merge needs runs from one device")
        rows = [row for r in runs for row in r["rows"]]
        table = render(rows, list(rows[0]["results"]), runs[0]["device"], runs[0]["peaks"])
        print(table)
        save_results("train_step", "gpu", table, {"device": runs[0]["device"], "peaks": runs[0]["peaks"],
                                                  "rows": rows, "merged": args.merge})  # fmt: skip
        return
    if args.profile:
        impl, *nums = args.profile
        profile(impl, *map(int, nums))
        return
    gpu = torch.cuda.is_available() and not args.cpu
    if args.variants:
        variants(gpu, args.steps or (20 if gpu else 5), args.shapes, args.batches, save=not args.no_save)
        return
    shapes, batches = (GPU_SHAPES, GPU_BATCHES) if gpu else (CPU_SHAPES, CPU_BATCHES)
    if args.shapes:
        shapes = [tuple(map(int, s.split(","))) for s in args.shapes]
    batches = args.batches or batches
    steps = args.steps or (20 if gpu else 5)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    impls = [("saelab-triton", sys.executable)] if gpu else []
    impls += [("saelab-torch", sys.executable), ("sparsify", sys.executable)]
    if not args.no_saelens and (python := saelens_python()):
        impls.append(("saelens", str(python)))
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"
    peaks = device_peaks()
    rows = []
    for shape in shapes:
        for batch in batches:
            results = {impl: run_one(py, impl, shape, batch, steps) for impl, py in impls}
            rows.append({"shape": shape, "batch": batch, "results": results,
                         "roofline_s": roofline_s(shape[0], shape[1], batch, peaks)})  # fmt: skip
            print(f"done {shape} x {batch}", file=sys.stderr)
    table = render(rows, [i for i, _ in impls], device, peaks)
    print(table)
    kind = ("gpu" if gpu else "cpu") + (f"-{args.part}" if args.part else "")
    save_results("train_step", kind, table, {"device": device, "peaks": peaks, "rows": rows})


def variants(gpu: bool, steps: int, shapes: list[str] | None, batches: list[int] | None, save: bool = True) -> None:
    """Time saelab's training step for every registered sparsifier and both transcoders at one shape and batch,
    print the table (throughput relative to TopK on the torch backend) and save it (`save`)."""
    from saelab.config import SPARSIFIER_NAMES

    d_in, d_sae, k = tuple(map(int, shapes[0].split(","))) if shapes else (GPU_SHAPES[1] if gpu else CPU_SHAPES[1])
    batch = (batches or [GPU_BATCHES[-1] if gpu else CPU_BATCHES[-1]])[0]
    if not gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    runs = [(name, "torch") for name in (*SPARSIFIER_NAMES, *TRANSCODERS)]
    if gpu:
        runs += [(name, "triton") for name in ("topk", "abstopk", "batchtopk")]
    results = {}
    for name, backend in runs:
        results[(name, backend)] = run_one(sys.executable, f"variant:{name}:{backend}", (d_in, d_sae, k), batch, steps)
        print(f"done {name} ({backend})", file=sys.stderr)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"
    base = results[("topk", "torch")]
    lines = [f"Device: {device}; d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}, {steps} timed steps each", "",
             "| variant | backend | tok/s | peak MiB | / topk (torch) |", "|---|---|---|---|---|"]  # fmt: skip
    for (name, backend), r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {backend} | error: {r['error']} | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if "error" not in base else math.nan
        mib = r["peak_bytes"] / 2**20
        lines.append(f"| {name} | {backend} | {r['tokens_per_s']:,.0f} | {mib:,.0f} | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    rows = [{"variant": n, "backend": b, **r} for (n, b), r in results.items()]
    if save:
        data = {"device": device, "rows": rows, "shape": [d_in, d_sae, k], "batch": batch}
        save_results("train_step_variants", "gpu" if gpu else "cpu", table, data)


def render(rows: list[dict], impls: list[str], device: str, peaks: dict) -> str:
    """Markdown table: tokens/s and peak memory per implementation, ratios against saelab's default."""
    base = impls[0]
    head = ["d_in, d_sae, k", "batch"]
    for impl in impls:
        head += [f"{impl} tok/s", f"{impl} peak MiB"]
    head += [f"{base} / {i}" for i in impls[1:]] + [f"{base} roofline"]
    lines = [f"Device: {device}; measured peaks: " + ", ".join(f"{k} {v:.3g}" for k, v in peaks.items()),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for row in rows:
        res = row["results"]
        cells = [", ".join(map(str, row["shape"])), str(row["batch"])]
        for impl in impls:
            r = res[impl]
            cells += ["error: " + r["error"], ""] if "error" in r else [
                f"{r['tokens_per_s']:,.0f}", f"{r['peak_bytes'] / 2**20:,.0f}"]  # fmt: skip
        ok = "error" not in res[base]
        for impl in impls[1:]:
            good = ok and "error" not in res[impl]
            cells.append(f"{res[base]['tokens_per_s'] / res[impl]['tokens_per_s']:.2f}x" if good else "-")
        cells.append(f"{row['roofline_s'] / res[base]['step_s']:.0%}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
