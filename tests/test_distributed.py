"""Distributed training on CPU with gloo: ranks are processes started here as torchrun starts them.

Each case compares against the same computation in one process (parameters allclose: the reductions
add in another order, so bit-identity is not expected).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, spec: dict, world: int, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run `world` ranks of dist_worker.py (one process without torchrun's variables when world is 1)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent), "TRITON_INTERPRET": "1"}
        if world > 1:
            env |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, json.dumps(spec)],
                cwd=WORKER.parent,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: ranks still running after {timeout} s (a hang)") from None
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} failed:\n{r.stderr[-4000:]}"


def _forward_cases(d_sae: int) -> list[dict]:
    half = d_sae // 2
    base = {"d_in": 8, "d_sae": d_sae, "k": 4, "auxk_k": 3}
    dead = [i % 3 == 0 for i in range(d_sae)]
    return [
        {"sae": base | {"sparsifier": "topk"}, "dead": dead},
        # every token's top k lies in the first shard
        {"sae": base | {"sparsifier": "topk"}, "b_enc": [8.0] * half + [0.0] * (d_sae - half), "dead": dead},
        {"sae": base | {"sparsifier": "abstopk"}, "dead": dead},
        {"sae": base | {"sparsifier": "relu"}},
        {"sae": base | {"sparsifier": "jumprelu", "jumprelu_bandwidth": 2.0, "jumprelu_init_threshold": 0.3}},
        {"sae": base | {"sparsifier": "jumprelu", "l0_target": 3.0, "jumprelu_bandwidth": 2.0}},
        {"sae": base | {"sparsifier": "batchtopk"}, "dead": dead},
        {"sae": base | {"sparsifier": "featurechoice"}},
        {"sae": base | {"sparsifier": "topk", "n_sources": 2}, "dead": dead},
        # the fused kernels (Triton's interpreter on CPU) select each shard's candidates
        {"sae": base | {"sparsifier": "topk", "backend": "triton"}, "dead": dead},
    ]


@pytest.mark.parametrize(
    ("world", "shards"), [(2, 2), (2, 1), (4, 2)], ids=["latent-sharded", "data-parallel", "2x2-mesh"]
)
def test_sharded_forward_and_gradients_equal_the_full_sae(world: int, shards: int) -> None:
    cases = _forward_cases(21)  # 21 latents: shards of 11 and 10
    if shards == 1:  # refused with latent shards
        cases.append({"sae": {"d_in": 8, "d_sae": 21, "k": 4, "sparsifier": "mutualchoice"}})
        cases.append({"sae": {"d_in": 8, "d_sae": 21, "k": 4, "sparsifier": "matryoshka", "matryoshka_widths": "5,16"}})
    results = launch("forward", {"saes": cases, "latent_shards": shards, "sae": {"d_in": 8}}, world=world)
    ok(results)
    assert all("forward ok" in r.stdout for r in results)


def test_first_shard_holds_every_winner() -> None:
    """The skewed case above really puts all of each token's top k in one shard."""
    from saelab import SAE, SAEConfig

    cfg = SAEConfig(d_in=8, d_sae=21, k=4, sparsifier="topk")
    torch.manual_seed(0)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_enc[:10].add_(8.0)
    idx = sae.encode_sparse(torch.randn(64, 8)).indices
    assert bool((idx < 11).all())


SPEC = {
    "n": 4096,
    "sae": {"d_in": 16, "d_sae": 40, "k": 3, "sparsifier": "topk"},
    "train": {
        "batch_size": 256,
        "epochs": 1.0,
        "lr": 3e-3,
        "warmup_steps": 2,
        "checkpoint_every": 0,
        "log_every": 4,
        "dead_after_tokens": 512,
        "geometric_median_samples": 128,
        "device": "cpu",
    },
}


def _run(tmp_path: Path, name: str, world: int, **changes) -> dict[str, torch.Tensor]:
    spec = json.loads(json.dumps(SPEC))
    spec["train"]["out_dir"] = str(tmp_path / name)
    for key, value in changes.items():
        if key in ("sparsifier", "d_out", "hook_name_out", "skip_connection"):
            spec["sae"][key] = value
        elif key in ("checkpoint_every",):
            spec["train"][key] = value
        else:
            spec[key] = value
    ok(launch("train", spec, world))
    final = tmp_path / name / "final.safetensors"
    return load_file(str(final)) if final.is_file() else {}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2e-4, atol=2e-5, msg=key)


SKIP_TRANSCODER = {"d_out": 16, "hook_name_out": "out", "skip_connection": True}


@pytest.mark.parametrize(
    "sae", [{"sparsifier": "topk"}, {"sparsifier": "batchtopk"}, {"sparsifier": "gsae"}, SKIP_TRANSCODER],
    ids=["topk", "batchtopk", "gsae", "skip_transcoder"],
)  # fmt: skip
def test_data_parallel_training_equals_one_process(tmp_path: Path, sae: dict) -> None:
    one = _run(tmp_path, "one", 1, **sae)
    two = _run(tmp_path, "two", 2, **sae)
    _close(one, two)
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ranks = metrics[-1]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["tokens_per_s"] > 0 for r in ranks)
    assert all(r["peak_mem_mb"] > 0 and r["comm_s"] >= 0 for r in ranks)


def test_latent_sharded_training_equals_one_process(tmp_path: Path) -> None:
    one = _run(tmp_path, "one", 1)
    two = _run(tmp_path, "two", 2, latent_shards=2)
    _close(one, two)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_resume_on_another_number_of_ranks(tmp_path: Path, first: int, second: int) -> None:
    straight = _run(tmp_path, "straight", 1)
    _run(tmp_path, "resumed", first, checkpoint_every=7, stop_at=7)
    assert (tmp_path / "resumed" / "checkpoint").is_dir() and not (tmp_path / "resumed" / "final.safetensors").exists()
    from saelab import SAE

    assert SAE.load(tmp_path / "resumed" / "checkpoint").d_sae == SPEC["sae"]["d_sae"]  # written whole, once
    resumed = _run(tmp_path, "resumed", second, checkpoint_every=7)
    _close(straight, resumed)


def test_ranks_that_disagree_stop_with_one_message(tmp_path: Path) -> None:
    spec = json.loads(json.dumps(SPEC)) | {"timeout": 30}
    spec["train"]["out_dir"] = str(tmp_path / "run")
    results = launch("mismatch", spec, world=2, timeout=120)
    for r in results:
        assert r.returncode != 0
        assert "ranks disagree about the run: sae" in r.stderr and "rank 0:" in r.stderr and "rank 1:" in r.stderr


def test_a_dead_rank_does_not_hang_the_others(tmp_path: Path) -> None:
    spec = json.loads(json.dumps(SPEC)) | {"timeout": 20, "die_at": 2}
    spec["train"]["out_dir"] = str(tmp_path / "run")
    t0 = time.monotonic()
    results = launch("train", spec, world=2, timeout=120)
    assert results[1].returncode == 3
    assert results[0].returncode != 0 and "another rank stopped or died" in results[0].stderr
    assert time.monotonic() - t0 < 90


def test_torchrun_cli_latent_sharded_equals_one_process(tiny_model_dir, corpus_dir, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m saelab train --latent_shards 2`: harvest, train, save, evaluate."""
    from test_cli import tiny_args

    from saelab import SAE

    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def train(out: str, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        args = ["-m", "saelab", "train", "--device", "cpu", "--checkpoint_every", "5", *extra]
        cmd = [sys.executable, *launcher, *args, *tiny_args(tiny_model_dir, corpus_dir, tmp_path / out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    train("one")
    two = train("two", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                extra=("--latent_shards", "2"))  # fmt: skip
    assert two.stdout.count("run saved to") == 1 and "CE loss recovered" in two.stdout
    # both ranks harvested a block of the corpus; the cache is the one a single process writes
    from saelab.activations import ActivationCache

    caches = [ActivationCache(tmp_path / run / "activations") for run in ("one", "two")]
    assert "harvest blocks.1.hook_resid_post (2 ranks)" in two.stderr
    assert caches[1].meta["shards"][0].startswith("rank00000_") and caches[1].meta["shards"][-1].startswith(
        "rank00001_"
    )
    assert {k: v for k, v in caches[0].meta.items() if k != "shards"} == {
        k: v for k, v in caches[1].meta.items() if k != "shards"
    }
    rows = [c.source().rows(np.arange(c.n_tokens)) for c in caches]
    assert torch.equal(rows[0], rows[1])
    a, b = SAE.load(tmp_path / "one"), SAE.load(tmp_path / "two")
    _close(a.state_dict(), b.state_dict())
    last = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(last["ranks"]) == 2


def test_three_hook_points_on_two_ranks_equal_their_single_runs(tiny_model_dir, corpus_dir, tmp_path: Path) -> None:
    """Three configs (their own hook, width and k) spread over 2 ranks: rank 0 harvests two hooks in one
    pass, rank 1 one; each SAE equals the one its config trains alone."""
    from test_cli import tiny_args

    from saelab import SAE

    args = tiny_args(tiny_model_dir, corpus_dir, "unused")
    common = [
        a
        for i, a in enumerate(args)
        if not {args[i - (i % 2)]} & {"--out_dir", "--data.hook_name", "--sae.k", "--sae.expansion_factor"}
    ]
    runs = [("blocks.0.hook_resid_post", 2, 4), ("blocks.1.hook_resid_post", 3, 5), ("blocks.1.hook_mlp_out", 1, 3)]
    configs = []
    for i, (hook, factor, k) in enumerate(runs):
        path = tmp_path / f"c{i}.toml"
        path.write_text(
            f'out_dir = "{tmp_path / "many" / str(i)}"\n[data]\nhook_name = "{hook}"\n'
            f"[sae]\nexpansion_factor = {factor}\nk = {k}\n"
        )
        configs += ["--config", str(path)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    done = subprocess.run([*launcher, "-m", "saelab", "train", *configs, *common, "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run saved to") == 3
    assert "harvest 2 hook points" in done.stderr and "harvest blocks.1.hook_resid_post" in done.stderr
    for i, (hook, factor, k) in enumerate(runs):
        alone = tmp_path / "alone" / str(i)
        cmd = [sys.executable, "-m", "saelab", "train", "--config", str(tmp_path / f"c{i}.toml"), *common]
        single = subprocess.run([*cmd, "--device", "cpu", "--out_dir", str(alone)],
                                capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
        assert single.returncode == 0, single.stderr[-3000:]
        a, b = SAE.load(tmp_path / "many" / str(i)), SAE.load(alone)
        assert a.cfg.hook_name == hook and a.d_sae == 32 * factor and a.cfg.k == k
        _close(a.state_dict(), b.state_dict())


def test_sharded_analysis_equals_one_process(tiny_model_dir, corpus_dir, tmp_path: Path) -> None:
    """`torchrun ... -m saelab analyze`: each rank spills its chunks, rank 0 reduces them into the store."""
    import duckdb
    from test_cli import tiny_args

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"

    def saelab(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *launcher, "-m", "saelab", *args], capture_output=True, text=True,
                              timeout=600, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    saelab("train", *tiny_args(tiny_model_dir, corpus_dir, run), "--device", "cpu", "--eval_tokens", "0")
    analysis = ["--tokens", "1024", "--model_batch_size", "4", "--n_top", "5"]
    saelab("analyze", str(run), "--store", str(tmp_path / "one.duckdb"), *analysis)
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()))
    two = saelab("analyze", str(run), "--store", str(tmp_path / "two.duckdb"), *analysis, launcher=torchrun)
    assert two.stdout.count("analysed 'run'") == 1
    assert "model + SAE: 100%" in two.stderr and "| 4/4 " in two.stderr  # 8 chunks, 4 on each rank
    assert not (tmp_path / ".two.duckdb.work").exists()  # the spill is removed once reduced

    def rows(store: str, table: str) -> list:
        with duckdb.connect(str(tmp_path / store), read_only=True) as con:
            return con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()

    for table in ("features", "examples"):
        one = rows("one.duckdb", table)
        assert one and one == rows("two.duckdb", table), table
    with (
        duckdb.connect(str(tmp_path / "one.duckdb"), read_only=True) as a,
        duckdb.connect(str(tmp_path / "two.duckdb"), read_only=True) as b,
    ):
        query = "SELECT n_tokens, n_outliers, n_dead, density_counts FROM saes"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_bad_distributed_settings_give_clear_errors(tmp_path: Path, capsys) -> None:
    from saelab.cli import main

    assert main(["train", "--hooks", "blocks.0.hook_resid_post,blocks.0.hook_resid_post"]) == 2
    assert "distinct hook points" in capsys.readouterr().err
    assert main(["train", "--latent_shards", "2", "--out_dir", str(tmp_path / "r")]) == 2
    assert "needs that many ranks: launch with torchrun" in capsys.readouterr().err
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'out_dir = "{tmp_path / "a"}"\nseed = 1\n')
    b.write_text(f'out_dir = "{tmp_path / "b"}"\nseed = 2\n')
    assert main(["train", "--config", str(a), "--config", str(b)]) == 2
    assert "same seed" in capsys.readouterr().err
    assert main(["train", "--config", str(a), "--config", str(a)]) == 2
    assert "its own out_dir" in capsys.readouterr().err
