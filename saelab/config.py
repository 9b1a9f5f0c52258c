"""Dataclass configs for SAEs, activation data and training.

Every field carries a docstring directly below it; `field_docs` reads those docstrings so the CLI's
`--help` shows them. `__post_init__` only validates: it never fills in values from the environment.

This module is at the bottom of saelab's layers (no torch): it names the sparsifiers and kernel
backends that exist, and `saelab.sparsifiers` / `saelab.ops` implement exactly those.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from saelab.errors import ConfigError

SPARSIFIER_NAMES = (
    "relu", "topk", "batchtopk", "abstopk", "mutualchoice", "featurechoice", "jumprelu", "matryoshka", "topafa",
    "gsae",
)  # fmt: skip
"""The sparsifiers `saelab.sparsifiers` registers (it refuses to register any other name)."""

K_FREE_SPARSIFIERS = frozenset({"relu", "jumprelu", "topafa"})
"""Sparsifiers whose sparsity comes from a penalty or a threshold rather than from k."""

SIGNED_SPARSIFIERS = frozenset({"abstopk"})
"""Sparsifiers whose features fire both ways (negative activations kept)."""

BACKENDS = ("auto", "torch", "triton")
"""Kernel backends of the hot ops (`saelab.ops.resolve_backend`)."""


@dataclass
class SAEConfig:
    """Architecture of one sparse autoencoder (saved as `cfg.json` beside the weights)."""

    d_in: int = 0
    """Width of the activations the SAE reads (d_model for a residual stream). 0 = take it from the hook point."""

    d_sae: int = 0
    """Number of latents. 0 = expansion_factor * d_in."""

    expansion_factor: int = 8
    """Latents per input dimension, used when d_sae is 0."""

    sparsifier: str = "topk"
    """How pre-activations become a sparse code: relu, topk, batchtopk, abstopk, mutualchoice, featurechoice,
    jumprelu (a learned threshold per latent and an L0 penalty), matryoshka (BatchTopK whose nested prefixes
    of latents each learn to reconstruct alone), topafa (each token keeps the fewest latents whose energy
    reaches its input's: no k), gsae (TopK whose training selection also weighs each latent by the LM loss's
    gradient along its decoder direction; needs data.gradients)."""

    k: int = 32
    """Active latents per token (top-k family); the batch-level variants spend a budget of k * batch."""

    l1_coeff: float = 5.0
    """relu only: weight of the L1 penalty (each latent weighted by its decoder row norm)."""

    l0_coeff: float = 1.0
    """jumprelu only: weight of the L0 penalty (trained through straight-through estimators)."""

    l0_target: float = 0.0
    """jumprelu only: aim for this mean L0 per token, penalising (L0 / target - 1)^2 instead of L0 (0 = off)."""

    jumprelu_bandwidth: float = 0.001
    """jumprelu only: width of the rectangle kernel of the threshold's pseudo-gradients (in normalised units)."""

    jumprelu_init_threshold: float = 0.001
    """jumprelu only: every latent's threshold at initialisation (in normalised units)."""

    afa_coeff: float = 1 / 32
    """topafa only: weight of the AFA loss, (||x|| - ||code||)^2 / d_in per token, which pulls the code's norm
    towards the input's (Lee et al. 2025)."""

    gsae_beta: float = 0.25
    """gsae only: weight of the gradient term in the training selection, which ranks latents by
    a * (1 + beta * |g . d|), g the LM loss's gradient at the hook (normalised to mean norm sqrt(d_in)) and d
    the latent's unit decoder direction."""

    d_out: int = 0
    """Width of what the SAE reconstructs: 0 = its own input (an SAE); > 0 = a transcoder's output at
    `hook_name_out` (set by the trainer from data.hook_name_out)."""

    hook_name_out: str = ""
    """Transcoders: the hook point whose activations the transcoder predicts and where it is spliced in
    (metadata, SAELens convention); '' = an SAE."""

    skip_connection: bool = False
    """Transcoders: add a learned linear map of the input, W_skip [d_in, d_out], to the output (a skip
    transcoder, Paulo et al. 2025)."""

    matryoshka_widths: str = ""
    """matryoshka only: comma-separated widths of the latent groups, summing to d_sae; prefix j is groups
    1..j ('' = 5 groups, each twice as wide as the one before)."""

    matryoshka_weights: str = ""
    """matryoshka only: comma-separated weight of each prefix's reconstruction loss ('' = equal weights)."""

    auxk_coeff: float = 1 / 32
    """Weight of the AuxK loss that makes dead latents predict the reconstruction error (top-k family)."""

    auxk_k: int = 0
    """Dead latents used by AuxK per token. 0 = d_in // 2 (Gao et al. 2024)."""

    zipf_coeff: float = 1 / 32
    """mutualchoice only: weight of aux_zipf_loss, which revives latents firing below a Zipf-law target."""

    zipf_exponent: float = 1.0
    """mutualchoice only: exponent s of the Zipf target density p(rank) ~ rank^-s."""

    backend: str = "auto"
    """Kernels for the top-k encoder and sparse decoder: auto (Triton on CUDA when installed), torch, triton."""

    candidate_factor: int = 4
    """batchtopk / mutualchoice on the triton backend: per-token candidates kept, as a multiple of k.
    Exactness is checked; a batch where a token may have more winners falls back to the dense path."""

    threshold_momentum: float = 0.99
    """Batch-level variants: EMA momentum of the inference threshold learned in training."""

    exclude_norm_above: float = 0.0
    """Inputs with a norm above this are massive-norm outliers the SAE was not trained on; evals and
    splicing pass them through unchanged (0 = none). Set by the trainer from the harvest."""

    model_name: str = ""
    """Model the SAE was trained on (metadata, SAELens convention)."""

    hook_name: str = ""
    """Hook point the SAE reads, e.g. blocks.12.hook_resid_post (metadata, SAELens convention)."""

    n_sources: int = 1
    """Activation sources sharing one code: 1 = an SAE; more = a crosscoder (saelab.sae.CrossCoder), each
    source of width d_in (layers of one model, or one layer of several models)."""

    def __post_init__(self) -> None:
        if self.sparsifier not in SPARSIFIER_NAMES:
            raise ConfigError(f"unknown sparsifier {self.sparsifier!r}; choose one of {sorted(SPARSIFIER_NAMES)}")
        for name in ("d_in", "d_sae", "auxk_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_sources < 1:
            raise ConfigError(f"n_sources must be >= 1, got {self.n_sources}")
        if self.expansion_factor < 1:
            raise ConfigError(f"expansion_factor must be >= 1, got {self.expansion_factor}")
        if self.candidate_factor < 1:
            raise ConfigError(f"candidate_factor must be >= 1, got {self.candidate_factor}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.sparsifier == "matryoshka" and self.d_sae:
            self._check_matryoshka()
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold < 0 or self.l0_target < 0:
            raise ConfigError("jumprelu_bandwidth must be > 0, and jumprelu_init_threshold and l0_target >= 0")
        if self.d_sae and self.k > self.d_sae and self.sparsifier not in K_FREE_SPARSIFIERS:
            raise ConfigError(f"k = {self.k} exceeds d_sae = {self.d_sae}: a token cannot use more latents than exist")
        if self.skip_connection and not self.transcoder and self.d_in:
            raise ConfigError("skip_connection needs a transcoder: set data.hook_name_out")
        if self.transcoder and self.d_in and self.d_out < 1:
            raise ConfigError("a transcoder needs d_out > 0, the width of its output hook")
        if self.transcoder and self.n_sources > 1:
            raise ConfigError("a crosscoder cannot also be a transcoder: set data.cross_sources or data.hook_name_out")
        if self.transcoder and self.sparsifier == "topafa":
            raise ConfigError("topafa reads its input's energy at inference, which a transcoder's target is not")
        if self.gsae_beta < 0:
            raise ConfigError(f"gsae_beta must be >= 0, got {self.gsae_beta}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ConfigError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")

    @property
    def transcoder(self) -> bool:
        """Whether this reconstructs another hook point than it reads (`d_out` or `hook_name_out` set)."""
        return bool(self.d_out or self.hook_name_out)

    def _check_matryoshka(self) -> None:
        try:
            widths, weights = self.matryoshka_groups()
        except ValueError as e:
            raise ConfigError(f"matryoshka_widths / matryoshka_weights must be comma-separated numbers: {e}") from None
        if sum(widths) != self.d_sae or min(widths) < 1:
            raise ConfigError(f"matryoshka_widths {widths} must be positive and sum to d_sae = {self.d_sae}")
        if len(weights) != len(widths) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(
                f"matryoshka_weights needs {len(widths)} non-negative weights (one per group), got {weights}"
            )

    def matryoshka_groups(self) -> tuple[list[int], list[float]]:
        """(group widths, prefix loss weights) of a matryoshka SAE with `d_sae` set."""
        if self.matryoshka_widths:
            widths = [int(w) for w in self.matryoshka_widths.split(",")]
        else:  # 5 groups doubling in width: 1/31, 2/31, 4/31, 8/31 and the rest of d_sae
            widths = [max(1, self.d_sae * 2**i // 31) for i in range(4)]
            widths.append(self.d_sae - sum(widths))
        weights = (
            [float(w) for w in self.matryoshka_weights.split(",")] if self.matryoshka_weights else [1.0] * len(widths)
        )
        return widths, weights

    def resolve(self, d_in: int) -> SAEConfig:
        """Return a copy with `d_in` (checked against a set value) and `d_sae` filled in."""
        if self.d_in and self.d_in != d_in:
            raise ConfigError(f"SAE d_in = {self.d_in} but the activations have width {d_in}")
        return dataclasses.replace(self, d_in=d_in, d_sae=self.d_sae or self.expansion_factor * d_in)


@dataclass
class DataConfig:
    """Where activations come from: a model, a hook point and a text corpus."""

    model: str = "smollm2-135m"
    """Model: 'smollm2-135m' (the offline default), a hub name, or a local HF directory."""

    hook_name: str = "blocks.12.hook_resid_post"
    """Hook point to read, in TransformerLens naming."""

    dataset: str = "shakespeare"
    """Corpus: 'shakespeare' or 'kjv' (offline), a hub dataset name, or local .txt/.json/.jsonl/.parquet files;
    'a+b' mixes corpora with equal token shares."""

    split: str = "train"
    """Dataset split to read."""

    text_column: str = "text"
    """Column holding the text."""

    context_size: int = 128
    """Tokens per sequence fed to the model."""

    model_batch_size: int = 32
    """Sequences per model forward pass."""

    n_tokens: int = 300_000
    """Training tokens to harvest (after excluding massive-norm tokens)."""

    holdout_every: int = 10
    """Every n-th sequence of the corpus is held out for evaluation and never trained on."""

    exclude_norm_factor: float = 6.0
    """Exclude tokens whose activation norm exceeds this multiple of the median norm (attention sinks). 0 = keep all."""

    buffer_tokens: int = 65_536
    """Size of the shuffling buffer that mixes activations across sequences (live source only)."""

    cross_sources: str = ""
    """Further sources read on the same tokens, which makes the run train a crosscoder: comma-separated
    'MODEL@HOOK' (another model, same tokenizer: model diffing) or 'HOOK' (another layer of `model`)."""

    def source_specs(self) -> list[tuple[str, str]]:
        """(model, hook) of every source: the main one first, then `cross_sources`."""
        specs = [(self.model, self.hook_name)]
        for item in filter(None, (part.strip() for part in self.cross_sources.split(","))):
            model, _, hook = item.rpartition("@")
            specs.append((model or self.model, hook))
        return specs

    hook_name_out: str = ""
    """Train a transcoder: read `hook_name` and reconstruct this later hook point, e.g. blocks.6.ln2.hook_normalized
    -> blocks.6.hook_mlp_out ('' = an SAE, which reconstructs its input)."""

    gradients: bool = False
    """Also harvest the LM loss's gradient at `hook_name` (one backward pass per batch), cached beside the
    activations: what a gsae trains on."""

    cache_dir: str = ""
    """Directory of the on-disk activation cache ('' = <out_dir>/activations); reused when it matches."""

    device: str = "auto"
    """Device for the model: auto, cpu, cuda, cuda:1 ..."""

    def __post_init__(self) -> None:
        for name in ("context_size", "model_batch_size", "n_tokens", "holdout_every", "buffer_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.exclude_norm_factor < 0:
            raise ConfigError(f"data.exclude_norm_factor must be >= 0, got {self.exclude_norm_factor}")
        if self.hook_name_out and (self.cross_sources or self.gradients or self.hook_name_out == self.hook_name):
            raise ConfigError(
                "data.hook_name_out (a transcoder) must differ from data.hook_name and excludes cross_sources and "
                "gradients"
            )
        specs = self.source_specs()
        if any(not hook for _, hook in specs) or len(set(specs)) != len(specs):
            raise ConfigError(f"data.cross_sources must name distinct MODEL@HOOK or HOOK sources, got {specs}")


@dataclass
class TrainConfig:
    """One training run: the SAE, its data, and the optimisation."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    """SAE architecture."""

    data: DataConfig = field(default_factory=DataConfig)
    """Activation data."""

    out_dir: str = "runs/sae"
    """Run directory: checkpoints, final SAE, metrics.jsonl."""

    batch_size: int = 4096
    """Activations per optimiser step."""

    epochs: float = 1.0
    """Passes over the harvested tokens (fractions allowed)."""

    lr: float = 0.0
    """Adam learning rate. 0 = 2e-4 / sqrt(d_sae / 16384), the scaling law of Gao et al. 2024."""

    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""

    decay_fraction: float = 0.2
    """Fraction of steps at the end over which the learning rate decays linearly to 0."""

    l1_warmup_fraction: float = 0.05
    """relu and jumprelu: fraction of steps over which the L1 (relu) or L0 (jumprelu) coefficient ramps up from 0."""

    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many training tokens counts as dead (and feeds AuxK)."""

    geometric_median_samples: int = 4096
    """Activations used to initialise b_dec at their geometric median (0 = keep b_dec at 0)."""

    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (0 = only at the end)."""

    log_every: int = 10
    """Write a metrics line to metrics.jsonl every this many steps."""

    seed: int = 0
    """Seed for initialisation and data order."""

    device: str = "auto"
    """Device for the SAE: auto, cpu, cuda ..."""

    autocast: bool = True
    """Use bf16 autocast on GPU (ignored on CPU)."""

    wandb_project: str = ""
    """Log to this Weights & Biases project if wandb is installed ('' = off)."""

    eval_tokens: int = 20_000
    """Held-out tokens for the final evaluation (0 = skip it)."""

    latent_shards: int = 1
    """Under torchrun: ranks that split each SAE's latents between them (must divide the number of ranks;
    the rest of the ranks are data-parallel replicas). 1 = plain data parallelism."""

    dist_timeout_s: float = 300.0
    """Under torchrun: seconds a rank waits for the others in a collective before it stops with an error."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            self.sae = from_dict(SAEConfig, self.sae, prefix="sae.")
        if isinstance(self.data, dict):
            self.data = from_dict(DataConfig, self.data, prefix="data.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if (self.sae.sparsifier == "gsae") != self.data.gradients:
            raise ConfigError("a gsae trains on the LM loss's gradients: set data.gradients = true with it (only)")
        if self.sae.skip_connection and not self.data.hook_name_out:
            raise ConfigError("sae.skip_connection needs a transcoder: set data.hook_name_out")
        if self.data.hook_name_out and self.sae.sparsifier == "topafa":
            raise ConfigError("topafa reads its input's energy at inference, which a transcoder's target is not")
        if self.latent_shards < 1 or self.dist_timeout_s <= 0:
            raise ConfigError("latent_shards must be >= 1 and dist_timeout_s > 0")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.lr < 0:
            raise ConfigError(f"lr must be >= 0, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.l1_warmup_fraction <= 1:
            raise ConfigError("decay_fraction and l1_warmup_fraction must lie in [0, 1]")


@dataclass
class AnalysisConfig:
    """How `saelab analyze` reads a trained SAE's features into the feature store."""

    n_tokens: int = 100_000
    """Held-out tokens to run the model and SAE over."""

    model_batch_size: int = 32
    """Sequences per model forward pass (also one resumable chunk of work)."""

    n_top: int = 20
    """Top-activating examples kept per feature."""

    n_bands: int = 10
    """Equal-width activation bands over (0, max activation] to sample examples from (as SAE-Vis does)."""

    per_band: int = 5
    """Examples sampled uniformly at random from each band."""

    context_before: int = 24
    """Tokens shown before an example's token."""

    context_after: int = 8
    """Tokens shown after an example's token."""

    min_context: int = 8
    """Tokens a token needs before it in its sequence to be chosen as a top example or band sample
    (earlier ones only when a feature has too few others); statistics count every firing."""

    hist_bins: int = 32
    """Bins of each feature's activation histogram."""

    n_logits: int = 10
    """Promoted and suppressed tokens kept per feature."""

    n_neighbours: int = 10
    """Nearest features by decoder cosine similarity kept per feature."""

    max_entries: int = 8_000_000
    """Non-zero activations held in memory at once while reducing (bounds memory for any n_tokens)."""

    seed: int = 0
    """Seed of the band sampling."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "model_batch_size", "n_top", "n_bands", "hist_bins", "max_entries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("per_band", "context_before", "context_after", "min_context", "n_logits", "n_neighbours"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


def mixture_parts(dataset: str) -> list[str]:
    """The corpora of a mixture `'a+b'` (a path that exists is one corpus, '+' or not), else `[dataset]`.

    `saelab.corpus.token_sequences` alternates their sequences, so sequence i came from part `i % len(parts)`.
    """
    return dataset.split("+") if "+" in dataset and not Path(dataset).exists() else [dataset]


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field of `cls` (and its bases) to the docstring written below it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + u for u in unknown]}; valid keys: {sorted(prefix + n for n in names)}"
        )
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a (nested) config, for JSON."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from a .toml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse config {path}: {e}") from e
    return from_dict(TrainConfig, raw)


def _coerce(text: str, typ: Any, key: str) -> Any:
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true/false, got {text!r}")
    try:
        return typ(text)
    except ValueError as e:
        raise ConfigError(f"--{key} expects {typ.__name__}, got {text!r}") from e


def apply_overrides(cfg: Any, overrides: dict[str, str]) -> Any:
    """Apply `{"sae.k": "64", "lr": "1e-3"}`-style string overrides to a config, type-checked, validated again."""
    raw = to_dict(cfg)
    for key, text in overrides.items():
        parts = key.split(".")
        cls: type = type(cfg)
        node = raw
        for part in parts[:-1]:
            hints = get_type_hints(cls)
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config key --{key}")
            cls, node = hints[part], node[part]
        leaf = parts[-1]
        hints = get_type_hints(cls)
        if leaf not in node or isinstance(node[leaf], dict):
            valid = sorted(k for k, v in node.items() if not isinstance(v, dict))
            raise ConfigError(f"unknown config key --{key}; valid keys here: {valid}")
        node[leaf] = _coerce(text, hints[leaf], key)
    return from_dict(type(cfg), raw)
