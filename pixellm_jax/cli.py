"""`pixellm` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from pixellm_jax.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file, or the name of one in configs/ (e.g. pixellm_7b)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixellm", description="PixelLM in JAX/Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="parameter counts of a config (abstract, no memory), optionally a tiny forward")
    _add_config_args(p)
    p.add_argument("--run-tiny", metavar="CONFIG", help="also build this (small) config and run one forward + loss")

    args = parser.parse_args(argv)
    try:
        if args.command == "describe":
            from pixellm_jax.describe import describe

            describe(args.config, args.overrides, run_tiny=args.run_tiny)
    except ConfigError as e:
        print(f"pixellm {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
