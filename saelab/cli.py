"""Command line: `saelab train --config FILE [--key value ...]`, `saelab eval RUN_DIR [--json]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import get_type_hints

from saelab.config import ConfigError, TrainConfig, apply_overrides, field_docs, load_config


def _add_config_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--[prefix]name` option per config field, its docstring as help (nested dataclasses recurse)."""
    docs, hints = field_docs(cls), get_type_hints(cls)
    group = parser.add_argument_group(f"{prefix.rstrip('.') or 'training'} options ({cls.__name__})")
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


def _cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from saelab.evals import format_table
    from saelab.trainer import train

    cfg = load_config(args.config) if args.config else TrainConfig()
    cfg = apply_overrides(cfg, overrides)
    run = train(cfg)
    print(f"run saved to {run}")
    eval_path = run / "eval.json"
    if eval_path.is_file():
        print(format_table(json.loads(eval_path.read_text())))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from saelab.evals import evaluate_run, format_table

    result = evaluate_run(args.run_dir, eval_tokens=args.tokens, all_tokens=args.all_tokens)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "density_histogram"}, indent=2))
    else:
        print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `saelab` argument parser."""
    parser = argparse.ArgumentParser(prog="saelab", description="Train, evaluate and browse sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train an SAE (harvesting activations if needed)",
        description="Train an SAE. Options override the config file's values.",
    )
    train.add_argument("--config", help="TOML or JSON TrainConfig file (see data/configs/)")
    _add_config_options(train, TrainConfig)
    ev = sub.add_parser("eval", help="evaluate a trained SAE on held-out text")
    ev.add_argument("run_dir", help="directory holding cfg.json and sae_weights.safetensors")
    ev.add_argument("--tokens", type=int, default=20_000, help="held-out tokens to evaluate on")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument(
        "--all-tokens", action="store_true", help="also report CE with the SAE spliced in at massive-norm tokens too"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `saelab` console script."""
    from saelab.activations import ActivationCache  # noqa: F401  (fail fast on a broken install)
    from saelab.sae import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
            return _cmd_train(args, overrides)
        return _cmd_eval(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"saelab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
