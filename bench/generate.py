"""Tokens per second of `saelab.steering.generate` with its key-value cache, unsteered and steered, against
Hugging Face's cached `generate` on the same model and the full recompute per token saelab did before.

    python bench/generate.py                     # offline default model, 64 new tokens, 3 repeats, 2 threads
    .venv-tl3/bin/python bench/generate.py       # the same on TransformerLens 3
    python bench/generate.py --model DIR --hook blocks.0.hook_resid_post --new-tokens 8   # another model

All runs are greedy from one prompt. Each row's tokens/s counts the tokens it actually generated (saelab
stops at EOS; HF is held to exactly --new-tokens), and saelab's tokens are checked against the full
recompute under the same steering, which they must equal. Repeats go round-robin over the rows, so a
busy neighbour slows them all alike; the table gives the median. The full recompute runs on the model as
saelab loads it now: on TransformerLens 3 that includes the weight layout of `saelab.models._copy_free_layout`,
without which it ran at ~2 tok/s on 2 cores.
Target: saelab's generate, unsteered and steered, at least as fast as HF's generate.
Results go to bench/results/generate-tl<TransformerLens major>-cpu-<commit>.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _common import ROOT, save_results

from saelab import SAE, SAEConfig
from saelab.models import OFFLINE_DEFAULT, LanguageModel, load_model, offline_default_dir, tl_major
from saelab.steering import Add, AddVector, Clamp, Intervention, diff_in_means, generate, intervene

PROMPT = "The history of the Roman Empire begins"


def full_recompute(model: LanguageModel, prompt: str, n: int, interventions: Sequence[Intervention]) -> list[int]:
    """saelab's generate before the key-value cache (greedy): a full pass over the whole sequence per token."""
    tokens = torch.tensor([model.tokenize([prompt])[0]])
    n_prompt = tokens.shape[1]
    with intervene(model, interventions):
        for _ in range(n):
            nxt = model.run_with_hooks(tokens)[0, -1].float().cpu().argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt[None]], dim=1)
            if int(nxt) == model.tokenizer.eos_token_id:
                break
    return tokens[0, n_prompt:].tolist()


def steering(model: LanguageModel, hook: str) -> dict[str, list[Intervention]]:
    """The steering settings timed: none, a difference-in-means vector, and a random SAE's features."""
    vector = diff_in_means(model, hook, ["I love this, it is wonderful"], ["I hate this, it is awful"])
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=model.d_model, d_sae=8 * model.d_model, k=32, hook_name=hook)).eval()
    return {
        "none": [],
        f"AddVector at {hook}": [AddVector(hook, vector, 4.0)],
        "Add through a random SAE (2 features)": [Add(sae, [1, 2], 8.0)],
        "Clamp through a random SAE (2 features)": [Clamp(sae, [1, 2], 8.0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=OFFLINE_DEFAULT, help="saelab model name or local HF directory")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post", help="hook point steered")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's figures are for 2)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = load_model(args.model, device="cpu")
    hf_dir = offline_default_dir() if args.model == OFFLINE_DEFAULT else Path(args.model)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt_ids = torch.tensor([model.tokenize([PROMPT])[0]])
    n = args.new_tokens
    settings = steering(model, args.hook)

    def hf_generate() -> list[int]:
        # min_new_tokens holds HF to exactly n tokens, EOS or not; the mask and pad id only keep HF quiet.
        out = hf.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=model.tokenizer.eos_token_id,
        )
        return out[0, prompt_ids.shape[1] :].tolist()

    reference = {name: full_recompute(model, PROMPT, n, ivs) for name, ivs in settings.items()}
    rows: dict[str, tuple[str, Callable[[], object]]] = {"HF generate (cached)": ("none", hf_generate)}
    for name, ivs in settings.items():
        rows[f"saelab generate: {name}"] = (name, lambda ivs=ivs: generate(model, PROMPT, n, ivs))
    for name in ("none", f"AddVector at {args.hook}"):
        rows[f"full recompute (before): {name}"] = (
            name,
            lambda ivs=settings[name]: full_recompute(model, PROMPT, n, ivs),
        )
    for _, run in rows.values():  # warm-up, and saelab's one-time cache check on this model
        run()

    times: dict[str, list[float]] = {label: [] for label in rows}
    outputs: dict[str, object] = {}
    for _ in range(args.repeats):
        for label, (_, run) in rows.items():
            t0 = time.perf_counter()
            outputs[label] = run()
            times[label].append(time.perf_counter() - t0)

    decode = model.tokenizer.decode
    results = {}
    for label, (name, _) in rows.items():
        ref, out = reference[name], outputs[label]
        if isinstance(out, str):  # saelab's generate returns text: equal to the reference's, or not
            same = out == decode(ref)
            count = len(ref) if same else len(model.tokenize([out])[0])
        else:
            same = out[: len(ref)] == ref
            count = len(out)
        rates = [count / t for t in times[label]]
        results[label] = {"steering": name, "new_tokens": count, "tok_s": rates, "same_as_full_recompute": same}

    hf_rate = statistics.median(results["HF generate (cached)"]["tok_s"])
    device = f"CPU {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores usable"
    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("transformer-lens", "transformers", "torch")}
    lines = [
        f"{n} new tokens, greedy, from {PROMPT!r} on {model.name}; {args.threads} torch threads, "
        f"{args.repeats} repeats; {', '.join(f'{k} {v}' for k, v in versions.items())}. Device: {device}.",
        "",
        "| run | new tokens | median tok/s | min - max tok/s | vs HF | same tokens as full recompute |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        med = statistics.median(r["tok_s"])
        same = "yes" if r["same_as_full_recompute"] else "NO"
        lines.append(
            f"| {label} | {r['new_tokens']} | {med:.1f} | {min(r['tok_s']):.1f} - {max(r['tok_s']):.1f}"
            f" | {med / hf_rate:.2f}x | {same} |"
        )
    saelab_rates = [statistics.median(r["tok_s"]) for label, r in results.items() if label.startswith("saelab")]
    ok = "met" if min(saelab_rates) >= hf_rate else "MISSED"
    lines += ["", f"Target: every saelab generate row >= HF generate ({hf_rate:.1f} tok/s): {ok}."]
    table = "\n".join(lines)
    print(table)
    if not args.no_save:
        data = {
            "device": device,
            "model": model.name,
            "prompt": PROMPT,
            "threads": args.threads,
            "versions": versions,
            "runs": results,
        }
        print(save_results(f"generate-tl{tl_major()}", "cpu", table, data).relative_to(ROOT))


if __name__ == "__main__":
    main()
