"""`pixellm` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from pixellm_jax.config import ConfigError
from pixellm_jax.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file, or the name of one in configs/ (e.g. pixellm_7b)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `eval` and `predict` (model, batching, decoding)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (params/, config.yaml, tokenizer/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides of the checkpoint's config")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--images-per-batch", type=int, default=8, help="per process; rounded up to whole devices")
    p.add_argument("--rows-per-batch", type=int, default=8, help="questions per batch, per process")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (official)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas-step", type=int, default=128, help="masks are computed on canvases rounded to this")


# Arguments that name files or directories: made absolute once, here, so that every layer below (Orbax
# among them) sees the path the user meant from the directory the command ran in.
PATH_ARGS = ("checkpoint", "out", "image", "source", "clip", "tokenizer", "root", "image_dir", "dataset_dir",
             "run_dir")
HUB_ID_ARGS = ("source", "clip", "tokenizer")  # `pixellm convert`: also a hub id (owner/name) when no local path


def _hub_id(args: argparse.Namespace, name: str, value: str) -> bool:
    """Whether `value` of `--name` is a hub id for `pixellm convert`: spelled like one and no local path."""
    from pathlib import Path

    if args.command != "convert" or name not in HUB_ID_ARGS or Path(value).exists():
        return False
    from pixellm_jax.convert.hub import parse_hub_id

    return parse_hub_id(value) is not None


def _absolute_paths(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pixellm_jax.data.specs import absolute_spec

    for name in PATH_ARGS:
        if name == "source" and args.command != "convert":  # prepare-data --source names a dataset kind
            continue
        value = getattr(args, name, None)
        if isinstance(value, str) and value and "://" not in value and not _hub_id(args, name, value):
            setattr(args, name, str(Path(value).absolute()))
    if getattr(args, "split", None) and args.command == "eval":
        args.split = [absolute_spec(s) for s in args.split]
    if getattr(args, "dataset", None):
        args.dataset = [absolute_spec(s) for s in args.dataset]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixellm", description="PixelLM in JAX/Flax NNX")
    debug_help = "show the traceback of an error, not one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="parameter counts of a config (abstract, no memory), optionally a tiny forward")
    _add_config_args(p)
    p.add_argument("--run-tiny", metavar="CONFIG", help="also build this (small) config and run one forward + loss")

    p = sub.add_parser("eval", help="evaluate a checkpoint on dataset splits: metrics JSON + per-sample JSONL")
    _add_inference_args(p)
    p.add_argument("--split", action="append", required=True, metavar="[NAME=]KIND:key=value,...",
                   help="a split to evaluate, e.g. refcoco_val=refer:root=data/refer_seg,dataset=refcoco,split=val "
                        "or muse:json=data/muse_val.json,images=data/coco (repeatable; see pixellm_jax/eval/splits.py)")
    p.add_argument("--dataset-dir", default="dataset",
                   help="the official ./dataset layout that splits named without paths are read from")
    p.add_argument("--num-points", type=int, default=12544, help="points of the MUSE matching cost")
    p.add_argument("--judge", action="store_true", help="also write LLM-judge prompts for generated answers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("predict", help="answer a question about an image or a folder; write overlays and masks")
    _add_inference_args(p)
    p.add_argument("--image", required=True, help="an image file or a folder of images")
    p.add_argument("--question", required=True)

    p = sub.add_parser("chat", help="talk about images in the terminal (multi-turn); write overlays and masks")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (params/, config.yaml, tokenizer/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides of the checkpoint's config")
    p.add_argument("--out", required=True, help="folder for each answer's overlay and masks")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (official)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas-step", type=int, default=128, help="masks are computed on canvases rounded to this")

    from pixellm_jax.convert.commands import add_convert_parser, add_export_parser

    add_convert_parser(sub)
    add_export_parser(sub)

    from pixellm_jax.serve import add_serve_parser

    add_serve_parser(sub)

    p = sub.add_parser("train", help="train (or resume) a run: sharded, checkpointed, preemption-safe")
    _add_config_args(p)

    p = sub.add_parser("build-tokenizer", help="build a small SentencePiece tokenizer from a config's training "
                                               "data (for runs from scratch; train.tokenizer=OUT uses it)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="tokenizer directory to write (tokenizer.model + config)")
    p.add_argument("--dataset", action="append", metavar="SPEC",
                   help="build from these dataset specs instead of the config's data.datasets (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing tokenizer directory")

    p = sub.add_parser("checkpoints", help="list a run's checkpoints with step, metrics and verification status")
    p.add_argument("run_dir", help="the run's train.output_dir")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="list only; do not restore and check")

    p = sub.add_parser("prepare-data", help="turn a raw dataset into a TFDS ArrayRecord dataset (read with TfdsSource)")
    p.add_argument("--source", required=True, help="refcoco, refcoco+, refcocog, refclef, muse or synthetic")
    p.add_argument("--root", help="the dataset in its released layout: the REFER root (refer_seg/), or the folder "
                                  "with muse_<split>.json")
    p.add_argument("--out", required=True, help="TFDS data_dir to write pixellm_records/<config>/ into")
    p.add_argument("--split", action="append", help="a split to prepare (repeatable; default: all of the dataset's)")
    p.add_argument("--split-by", help="REFER partition (default: umd for refcocog, unc otherwise)")
    p.add_argument("--image-dir", help="image folder when not in the official place under --root")
    p.add_argument("--num-samples", type=int, nargs="+", default=[10000],
                   help="synthetic: scenes per split (one count, or with --layout muse one per --split)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed of the first split (the next: +1, ...)")
    p.add_argument("--layout", choices=["tfds", "muse"], default="tfds",
                   help="synthetic: tfds (ArrayRecord records) or muse (MUSE-layout JSON + PNG images under --out, "
                        "reasoning questions in muse_<split>.json, referring ones in refer_<split>.json)")
    p.add_argument("--reasoning-questions", type=int, default=3,
                   help="synthetic --layout muse: multi-target reasoning questions per image (kinds in turn)")
    p.add_argument("--refer-questions", type=int, default=2,
                   help="synthetic --layout muse: referring questions per image")
    p.add_argument("--on-bad-sample", choices=["skip", "raise"], default="skip",
                   help="skip (and list in the metadata) or stop at an unusable record")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")

    for command_parser in sub.choices.values():  # `pixellm <command> --debug` too
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    args = parser.parse_args(argv)
    try:
        _absolute_paths(args)
        if args.command == "describe":
            from pixellm_jax.describe import describe

            describe(args.config, args.overrides, run_tiny=args.run_tiny)
        elif args.command == "build-tokenizer":
            from pixellm_jax.train.data import build_tokenizer_command

            return build_tokenizer_command(args)
        elif args.command == "checkpoints":
            from pixellm_jax.train.checkpoints_command import checkpoints_command

            return checkpoints_command(args)
        elif args.command == "train":
            from pixellm_jax.train.loop import main as train_main

            return train_main(args.config, args.overrides)
        elif args.command in ("eval", "predict"):
            from pixellm_jax.eval import commands

            run = commands.eval_command if args.command == "eval" else commands.predict_command
            run(args, commands.load(args))
        elif args.command == "chat":
            from pixellm_jax.chat import chat_command

            return chat_command(args)
        elif args.command in ("convert", "export"):
            from pixellm_jax.convert import commands

            return commands.run_convert(args) if args.command == "convert" else commands.run_export(args)
        elif args.command == "serve":
            from pixellm_jax.serve import serve

            return serve(args)
        elif args.command == "prepare-data":
            if args.layout == "muse":
                if args.source != "synthetic":
                    parser.error("--layout muse writes the synthetic dataset only (--source synthetic)")
                from pixellm_jax.data.synthetic_layout import prepare_synthetic_command

                return prepare_synthetic_command(args)
            from pixellm_jax.data.tfds_prepare import prepare_command

            return prepare_command(args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"pixellm {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # a bad input file, an unwritable output, an evaluation that scored nothing
        if args.debug:
            raise
        print(f"pixellm {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
