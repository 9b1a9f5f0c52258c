"""Running saelab under `torchrun`: the process group, the device mesh, and ranks that must agree.

`torchrun --nproc-per-node N -m saelab train ...` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; `init` reads them (and does nothing for a plain
`python -m saelab`). The ranks form a 2-D mesh, replicas x latent shards:

    rank = replica * latent_shards + shard

so the shards of one replica are neighbours (on one machine, joined by NVLink, where their per-step
collectives belong) and replicas may span machines (one gradient all-reduce per step). Each rank
uses the device of its local rank (`cuda:LOCAL_RANK`, NCCL) or the CPU (gloo).

A rank that raises, dies or hangs must not leave the others waiting forever: every collective has
the process group's timeout (`TrainConfig.dist_timeout_s`), a lost peer turns into a `TrainingError`
(`saelab.collectives`), and ranks that disagree about what they are running stop together with one
message (`check_agreement`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from saelab import __version__
from saelab.collectives import COMM
from saelab.errors import ConfigError, SetupError
from saelab.models import resolve_device
from saelab.sharding import Groups

T = TypeVar("T")
PATIENT_TIMEOUT_S = 24 * 3600
"""How long ranks wait for one rank's long solo work (a harvest, an evaluation)."""


@dataclass
class Mesh:
    """This process's place among the ranks of a distributed run."""

    rank: int
    """Global rank."""
    world: int
    """Number of ranks."""
    local_rank: int
    """Rank on this machine (picks the GPU)."""
    device: torch.device
    """Device of this rank."""
    groups: Groups = field(default_factory=Groups)
    """The replica / latent-shard process groups of the SAE this rank trains."""
    patient: Any = None
    """A gloo group with a long timeout, for waiting while one rank does long work alone (harvest, eval)."""

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files and logs (rank 0)."""
        return self.rank == 0

    @property
    def replica(self) -> int:
        """Index of this rank's data-parallel replica (which part of each batch it reads)."""
        return self.rank // self.groups.n_shards

    def wait(self) -> None:
        """Wait for every rank, however long the slowest takes (a rank that dies still ends the wait)."""
        COMM.run(lambda _: dist.barrier(group=self.patient), torch.zeros(1))

    def main_first(self, work: Callable[[], T]) -> T:
        """`work()` on rank 0 while the others wait, then on the others (which then find its results on
        disk: a harvested cache, a written store)."""
        if self.is_main:
            out = work()
            self.wait()
            return out
        self.wait()
        return work()


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto", latent_shards: int = 1, timeout_s: float = 300.0) -> Mesh | None:
    """Join the process group torchrun describes and build the mesh; None when not launched that way.

    The backend follows the device: NCCL for CUDA, gloo for the CPU.
    """
    if not launched():
        if latent_shards != 1:
            raise ConfigError(f"latent_shards = {latent_shards} needs that many ranks: launch with torchrun")
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if latent_shards < 1 or world % latent_shards:
        raise ConfigError(f"latent_shards = {latent_shards} must divide the number of ranks ({world})")
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SetupError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    n_rep = world // latent_shards
    # Every rank creates every group, in the same order (torch.distributed requires it).
    shard_groups = [dist.new_group(list(range(r * latent_shards, (r + 1) * latent_shards))) for r in range(n_rep)]
    replica_groups = [dist.new_group(list(range(s, world, latent_shards))) for s in range(latent_shards)]
    replica, shard = divmod(rank, latent_shards)
    groups = Groups(
        shard=shard,
        n_shards=latent_shards,
        shards=shard_groups[replica] if latent_shards > 1 else None,
        replicas=replica_groups[shard] if n_rep > 1 else None,
        world=dist.group.WORLD,
    )
    patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PATIENT_TIMEOUT_S))
    return Mesh(rank=rank, world=world, local_rank=local_rank, device=dev, groups=groups, patient=patient)


def finish(mesh: Mesh | None, ok: bool = True) -> None:
    """Leave the process group; when `ok`, after every rank has finished (so none exits while others
    still need it). After an error there is no waiting: the others learn of it from their next collective."""
    if mesh is None or not dist.is_initialized():
        return
    if ok:
        mesh.wait()
    dist.destroy_process_group()


def check_agreement(mesh: Mesh | None, what: str, facts: dict[str, Any]) -> None:
    """Stop every rank with the same error unless all ranks hold the same `facts` (JSON-like values).

    saelab's and torch's versions are always compared too.
    """
    if mesh is None:
        return
    facts = {"saelab version": __version__, "torch version": torch.__version__} | facts
    every = gather_objects(mesh, facts)
    differ = []
    for key in facts:
        values = [f.get(key) for f in every]
        if any(v != values[0] for v in values):
            by_rank = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            differ.append(f"{key} ({by_rank})")
    if differ:
        raise ConfigError(f"the {mesh.world} ranks disagree about the {what}: " + "; ".join(differ))


def gather_objects(mesh: Mesh, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank (waiting as long as the slowest needs)."""
    every: list[Any] = [None] * mesh.world
    dist.all_gather_object(every, obj, group=mesh.patient)
    return every


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank so far: allocated on its GPU, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
