"""Command line: `saelab train [--config FILE ...] [--hooks H1,H2,...] [--key value ...]` (under torchrun
too), `saelab eval RUN_DIR [--json]`,
`saelab analyze RUN_DIR --tokens N [--store PATH]`, `saelab diff SAE_ID`, `saelab finetune --out DIR`,
`saelab export RUN_DIR --format saelens|sparsify --out DIR`,
`saelab app [--store PATH] [--host H] [--port P]`.

Errors saelab raises on purpose (`saelab.errors.SaelabError`: bad input, broken files) print one
line and exit with status 2; `--debug` shows their traceback too. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn, get_type_hints

from saelab.app import DEFAULT_STORE, MAIN, STORE_ENV
from saelab.config import AnalysisConfig, DataConfig, TrainConfig, apply_overrides, field_docs, load_config
from saelab.errors import ConfigError, SaelabError, SetupError


def _add_config_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--[prefix]name` option per config field, its docstring as help (nested dataclasses recurse)."""
    docs, hints = field_docs(cls), get_type_hints(cls)
    group = parser.add_argument_group(f"{prefix.replace('.', ' ')}options ({cls.__name__})")
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            _add_config_options(parser, typ, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(
            f"--{prefix}{f.name}",
            dest=prefix + f.name,
            default=argparse.SUPPRESS,
            metavar=typ.__name__.upper(),
            help=f"{docs.get(f.name, '')} (default: {default!r})",
        )


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """--model / --hook / --dataset: what an SAE from another library reads, where its files do not say."""
    parser.add_argument("--model", default=None, help="model the SAE reads (default: the run's, or its metadata's)")
    parser.add_argument("--hook", default=None, help="hook point, e.g. blocks.6.hook_resid_post (default: as above)")
    parser.add_argument("--dataset", default=None, help="corpus to run on (default: the run's, else shakespeare)")


def _cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from saelab.results import format_table
    from saelab.rundir import RunDir
    from saelab.trainer import per_hook, train, train_many

    cfgs = [apply_overrides(load_config(path), overrides) for path in args.config or []]
    cfgs = cfgs or [apply_overrides(TrainConfig(), overrides)]
    if args.hooks:
        if len(cfgs) > 1:
            raise ConfigError("give --hooks with one config (each hook gets a copy of it), or several --config files")
        cfgs = per_hook(cfgs[0], [h.strip() for h in args.hooks.split(",") if h.strip()])
    runs = [train(cfgs[0])] if len(cfgs) == 1 else train_many(cfgs)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return 0
    for run in runs:
        print(f"run saved to {run}")
        result = RunDir(run).read_eval()
        if result is not None:
            print(format_table(result))
    return 0


def _data(args: argparse.Namespace) -> DataConfig | None:
    """The run's data config with --model / --hook / --dataset applied (for SAEs from other libraries,
    whose files may not say what they read), or None to use the run's own."""
    from saelab.rundir import RunDir

    if not (args.model or args.hook or args.dataset):
        return None
    return RunDir(args.run_dir).data_config(args.model, args.hook, args.dataset)


def _cmd_eval(args: argparse.Namespace) -> int:
    from saelab.evals import evaluate_run
    from saelab.results import format_table

    result = evaluate_run(args.run_dir, data=_data(args), eval_tokens=args.tokens, all_tokens=args.all_tokens)
    if args.json:
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "density_histogram"}, indent=2))
    else:
        print(format_table(result))
    return 0


def _cmd_analyze(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from saelab.analysis import analyze

    cfg = apply_overrides(AnalysisConfig(), overrides)
    info = analyze(args.run_dir, args.store, cfg, sae_id=args.name, data=_data(args))
    if os.environ.get("RANK", "0") != "0":
        return 0
    t = info.timings
    rest = sum(v for k, v in t.items() if k != "model_forward_s")
    print(f"analysed {info.sae_id!r} into {args.store}")
    print(f"  features {info.d_sae}, tokens {info.n_tokens} (+{info.n_outliers} skipped: massive norms or non-finite)")
    print(f"  features that never fired: {info.n_dead}")
    print(f"  model forward {t['model_forward_s']:.1f} s; everything else {rest:.1f} s")
    print("  (" + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items() if k != "model_forward_s") + ")")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from saelab.export import export
    from saelab.rundir import RunDir

    sae = RunDir(args.run_dir).load_sae()
    out = export(sae, args.out, args.format)
    print(f"exported {args.run_dir} ({sae.cfg.sparsifier}, {sae.d_sae} latents) as {args.format} to {out}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from saelab.finetune import finetune

    out = finetune(
        args.base, args.dataset, args.out, args.steps, args.batch_size, args.context_size, args.lr, seed=args.seed
    )
    print(f"fine-tuned model saved to {out} (load it with --data.model {out})")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from saelab.diffing import report
    from saelab.store import FeatureStore

    with FeatureStore(args.store) as fs:
        print(report(fs, args.sae_id, top=args.top, examples=args.examples, nu_below=args.nu_below))
    return 0


def _cmd_app(args: argparse.Namespace) -> NoReturn:
    store = os.path.abspath(args.store)
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise SetupError(f"cannot serve on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    if not os.path.exists(store):
        print(f"saelab app: no feature store at {store} yet; the app says how to build one", file=sys.stderr)
    print(f"saelab app: serving {store} at http://{args.host}:{args.port}", flush=True)
    cmd = [sys.executable, "-m", "streamlit", "run", str(MAIN), "--server.address", args.host]
    cmd += ["--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    cmd += ["--client.toolbarMode", "minimal"]
    # Become the server (no child process), so stopping `saelab app` stops the server too.
    os.execve(sys.executable, cmd, os.environ | {STORE_ENV: store})


def build_parser() -> argparse.ArgumentParser:
    """The `saelab` argument parser."""
    parser = argparse.ArgumentParser(prog="saelab", description="Train, evaluate and browse sparse autoencoders.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of saelab's own errors too")
    # Also accepted after the command; SUPPRESS keeps a subcommand from resetting the flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    train = add(
        "train",
        help="train an SAE (harvesting activations if needed)",
        description="Train an SAE. Options override the config file's values.",
    )
    train.add_argument(
        "--config",
        action="append",
        help="TOML or JSON TrainConfig file (see data/configs/); several train one SAE each from one harvest "
        "(they may differ in hook point, SAE and optimisation)",
    )
    train.add_argument(
        "--hooks",
        default=None,
        help="comma-separated hook points: one SAE on each, from one harvest, run i in <out_dir>/<hook i>",
    )
    _add_config_options(train, TrainConfig)
    ev = add("eval", help="evaluate a trained SAE on held-out text")
    ev.add_argument("run_dir", help="directory holding cfg.json and sae_weights.safetensors")
    ev.add_argument("--tokens", type=int, default=20_000, help="held-out tokens to evaluate on")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument(
        "--all-tokens", action="store_true", help="also report CE with the SAE spliced in at massive-norm tokens too"
    )
    _add_source_options(ev)
    an = add(
        "analyze",
        help="analyse a trained SAE's features into the DuckDB feature store",
        description="Run the model with the SAE over held-out text and write feature statistics, examples, "
        "logit effects and neighbours to the feature store (resumable; readers see the old store until done).",
    )
    an.add_argument("run_dir", help="directory holding cfg.json and sae_weights.safetensors")
    an.add_argument("--store", default=DEFAULT_STORE, help=f"feature store file (default: {DEFAULT_STORE})")
    an.add_argument("--name", default=None, help="id of the SAE in the store (default: the run directory's name)")
    an.add_argument("--tokens", dest="n_tokens", default=argparse.SUPPRESS, help="same as --n_tokens")
    _add_source_options(an)
    _add_config_options(an, AnalysisConfig)
    ex = add(
        "export",
        help="write an SAE as SAELens or sparsify save theirs",
        description="Write the SAE of a run directory (or any SAE that SAE.load reads) in another library's format, "
        "its input scale folded in exactly, so that library loads it and finds the same latents.",
    )
    ex.add_argument("run_dir", help="run directory or SAE folder")
    ex.add_argument("--format", required=True, choices=["saelens", "sparsify"], help="the library to write for")
    ex.add_argument("--out", required=True, help="output folder (for sparsify, name it after the layer: layers.N)")
    ft = add(
        "finetune",
        help="fine-tune a model on a corpus (a second model to diff against the base)",
        description="Continue training a causal LM on a corpus and save it as a Hugging Face directory.",
    )
    ft.add_argument("--base", default="smollm2-135m", help="model to start from (default: the offline default)")
    ft.add_argument("--dataset", default="kjv", help="corpus (default: kjv, the offline King James bible)")
    ft.add_argument("--out", required=True, help="output directory")
    ft.add_argument("--steps", type=int, default=200, help="optimiser steps")
    ft.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    ft.add_argument("--context_size", type=int, default=128, help="tokens per sequence")
    ft.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate")
    ft.add_argument("--seed", type=int, default=0, help="seed for data order")
    df = add(
        "diff",
        help="summarise an analysed crosscoder's model diffing from the feature store",
        description="Latents per diffing class (and how many Latent Scaling confirms), then the latents that "
        "lean most to each source with their top activating contexts; for an analysis of a mixture of corpora "
        "('a+b'), which corpus those latents' top examples come from.",
    )
    df.add_argument("sae_id", help="id of the crosscoder in the store (the run directory's name by default)")
    df.add_argument("--store", default=DEFAULT_STORE, help=f"feature store file (default: {DEFAULT_STORE})")
    df.add_argument("--top", type=int, default=5, help="latents to show per source")
    df.add_argument("--examples", type=int, default=3, help="top examples to show per latent")
    df.add_argument("--nu_below", type=float, default=0.3, help="Latent Scaling cut for confirmed latents")
    ap = add(
        "app",
        help="browse a feature store in the web app",
        description="Serve the Streamlit app on a feature store (bound to localhost unless --host says otherwise).",
    )
    ap.add_argument("--store", default=DEFAULT_STORE, help=f"feature store file (default: {DEFAULT_STORE})")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    ap.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `saelab` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "hooks", "debug")}
            return _cmd_train(args, overrides)
        if args.command == "finetune":
            return _cmd_finetune(args)
        if args.command == "analyze":
            skip = ("command", "run_dir", "store", "name", "debug", "model", "hook", "dataset")
            return _cmd_analyze(args, {k: v for k, v in vars(args).items() if k not in skip})
        if args.command == "diff":
            return _cmd_diff(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "app":
            return _cmd_app(args)
        return _cmd_eval(args)
    except SaelabError as e:
        if args.debug:
            raise
        print(f"saelab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
