"""The layout of a training run's directory, known here and nowhere else.

    <run>/cfg.json, sae_weights.safetensors   the final SAE (`SAE.save` / `SAE.load`)
    <run>/train_config.json                   the TrainConfig the run was started with
    <run>/metrics.jsonl                       one JSON object per logged training step
    <run>/eval.json                           the held-out evaluation (`EvalResult.to_dict()`)
    <run>/checkpoint/                         resumable state: an SAE directory plus trainer_state.*
    <run>/activations/                        the activation cache, unless `data.cache_dir` names another

A directory holding only an SAE (cfg.json + weights, e.g. one written by `SAE.save`) is a run too:
what it lacks reads as absent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from saelab import formats
from saelab.activations import load_cross_sources
from saelab.config import DataConfig, TrainConfig, from_dict, to_dict
from saelab.errors import CheckpointError, DataError
from saelab.files import latest, write_atomic
from saelab.models import LanguageModel, load_model
from saelab.sae import CFG_FILE, SAE, read_sae_config


class LoadedRun(NamedTuple):
    """A run ready for inference (`RunDir.load`)."""

    sae: SAE
    """The final SAE (or CrossCoder), in eval mode, on the model's device."""
    data: DataConfig
    """The data config: the run's own unless another was given."""
    sources: list[tuple[LanguageModel, str]]
    """(model, hook) of each source the SAE reads: the main one first, then a crosscoder's others."""


class RunDir:
    """Paths and small reads / writes of one run directory (see the module docstring)."""

    TRAIN_CONFIG = "train_config.json"
    METRICS = "metrics.jsonl"
    EVAL = "eval.json"
    CHECKPOINT = "checkpoint"
    ACTIVATIONS = "activations"
    TRAINER_STATE = "trainer_state.json"
    TRAINER_TENSORS = "trainer_state.safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The run's name: its directory's name (the default id in the feature store)."""
        return self.path.resolve().name

    @property
    def checkpoint(self) -> Path:
        """Where the trainer writes its resumable checkpoint."""
        return self.path / self.CHECKPOINT

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, including one a kill left mid-swap; None if there is none."""
        return latest(self.checkpoint)

    def activation_cache(self, data: DataConfig) -> Path:
        """The activation cache this run trains from."""
        return Path(data.cache_dir) if data.cache_dir else self.path / self.ACTIVATIONS

    # -- the SAE ----------------------------------------------------------------------------------

    def load_sae(self, device: str = "cpu") -> SAE:
        """The final SAE (an SAE or a CrossCoder), in eval mode."""
        return SAE.load(self.path, device)

    def load(self, model: LanguageModel | None = None, data: DataConfig | None = None) -> LoadedRun:
        """The SAE with the model(s) it reads; `model` and `data` default to what the run trained with.

        A crosscoder's further sources (other layers, or other models on the same tokens) come from
        `data.cross_sources`, reusing `model` where they name it.
        """
        sae = self.load_sae()
        data = data or self.data_config()
        model = model or load_model(data.model, data.device)
        sae.to(model.device)
        return LoadedRun(sae, data, [(model, sae.cfg.hook_name or data.hook_name), *load_cross_sources(model, data)])

    def data_config(
        self, model: str | None = None, hook_name: str | None = None, dataset: str | None = None
    ) -> DataConfig:
        """The data config the run trained with (train_config.json), else one built from the SAE's metadata
        (saelab's cfg.json, or another library's files: `saelab.formats`); `model`, `hook_name` and
        `dataset` replace what they say, or fill in what they leave out."""
        path = self.path / self.TRAIN_CONFIG
        given = {k: v for k, v in (("model", model), ("hook_name", hook_name), ("dataset", dataset)) if v}
        if path.is_file():
            data = from_dict(DataConfig, self._json(path)["data"], prefix="data.")
            return dataclasses.replace(data, **given)
        imported = formats.read(self.path)
        if imported is None and not (self.path / CFG_FILE).is_file():
            raise CheckpointError(f"{self.path} is not an SAE directory: {CFG_FILE} is missing")
        cfg = imported.cfg if imported is not None else read_sae_config(self.path)
        found = {"model": cfg.model_name, "hook_name": cfg.hook_name} | given
        missing = [name for name in ("model", "hook_name") if not found.get(name)]
        if missing:
            flags = " and ".join(f"--{'hook' if m == 'hook_name' else m}" for m in missing)
            raise DataError(
                f"{self.path}: the SAE's files do not say which {' and '.join(missing)} it reads; give {flags}"
            )
        return DataConfig(**found)

    def write_train_config(self, cfg: TrainConfig) -> None:
        """Record the config the run starts with."""
        write_atomic(self.path / self.TRAIN_CONFIG, json.dumps(to_dict(cfg), indent=2))

    # -- metrics and eval -------------------------------------------------------------------------

    def metrics(self) -> Iterator[dict[str, Any]]:
        """The logged training steps in order (nothing if the run was never trained here)."""
        for _, record in self._metric_lines():
            yield record

    def _metric_lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(line, record) of each logged step; a last line a kill cut short is skipped."""
        path = self.path / self.METRICS
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        for i, line in enumerate(lines):
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise CheckpointError(f"{path} is corrupt at line {i + 1}: {e}") from e

    def last_metrics(self) -> dict[str, Any] | None:
        """The last logged step, or None."""
        records = list(self.metrics())
        return records[-1] if records else None

    def open_metrics_log(self, step: int) -> TextIO:
        """metrics.jsonl opened for appending, first cut back to `step` so a resumed run logs no step twice."""
        self.path.mkdir(parents=True, exist_ok=True)
        kept = [line + "\n" for line, record in self._metric_lines() if record.get("step", 0) <= step]
        write_atomic(self.path / self.METRICS, "".join(kept))
        return (self.path / self.METRICS).open("a")

    def read_eval(self) -> dict[str, Any] | None:
        """The eval.json dict, or None if the run was never evaluated."""
        path = self.path / self.EVAL
        return self._json(path) if path.is_file() else None

    def write_eval(self, result: dict[str, Any]) -> None:
        """Write eval.json."""
        write_atomic(self.path / self.EVAL, json.dumps(result, indent=2))

    @staticmethod
    def _json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: {e}") from e
