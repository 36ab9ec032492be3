"""`pixellm convert` and `pixellm export`: parsed arguments -> importers / exporters -> files."""

from __future__ import annotations

import argparse
import sys

from pixellm_jax.convert.errors import ConversionError

EXPORTS = ("pixellm", "llava-hf", "peft")


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="import PyTorch weights (PixelLM release + CLIP, llava-hf, original LLaVA)")
    p.add_argument("source", help="checkpoint directory (PixelLM: the hf_model/ folder or its parent), or a hub id "
                                   "owner/name[@revision] fetched into the Hugging Face cache (a local path wins)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides (right after SOURCE), applied last")
    p.add_argument("--out", help="output checkpoint directory (written beside, renamed when complete)")
    p.add_argument("--from", dest="kind", default="auto", choices=("auto", "pixellm", "llava-hf", "llava"),
                   help="source layout (default: from its config.json)")
    p.add_argument("--clip", help="OpenAI CLIP checkpoint directory or hub id, e.g. openai/clip-vit-large-patch14-336 "
                                  "(needed for PixelLM and original LLaVA)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id if not beside the weights")
    p.add_argument("--config", default="pixellm_7b", help="base config the source's architecture is written into")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="print the key mapping and the config; write nothing")
    p.add_argument("--mesh", action="store_true",
                   help="build every parameter sharded over the config's mesh (each device reads its own slices)")
    p.add_argument("--check", action="store_true",
                   help="compare every stored tensor with the source, and an image + question through PyTorch built "
                        "from the source and through the converted model, stage by stage; exit 1 past tolerance")
    p.add_argument("--prompt", help="the question --check asks")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert source tensors holding NaN/Inf as they are, with a warning per key "
                        "(default: stop with an error naming the key)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as PyTorch: PixelLM release, llava-hf, or a peft adapter")
    p.add_argument("checkpoint", help="pixellm-jax checkpoint directory (from `pixellm convert`)")
    p.add_argument("--to", required=True, choices=EXPORTS)
    p.add_argument("--out", required=True, help="output directory (written beside, renamed when complete)")
    p.add_argument("--no-merge-lora", action="store_true",
                   help="leave LoRA out of the base weights (export it with --to peft)")
    p.add_argument("--dtype", help="official (PixelLM release mix; default there), keep (llava-hf default), "
                                   "float32, bfloat16 or float16")
    p.add_argument("--max-shard-size", help="largest shard, e.g. 10GB (PixelLM default) or 5GB (llava-hf default)")
    p.add_argument("--base-model", help="base_model_name_or_path written into the peft adapter config")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _quiet_orbax() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def run_convert(args: argparse.Namespace) -> int:
    from pixellm_jax.config import dump_config
    from pixellm_jax.convert.converter import convert_checkpoint, plan_conversion
    from pixellm_jax.convert.importers import prepare_import

    _quiet_orbax()
    try:
        if not args.dry_run and not args.out:
            raise ConversionError("--out is required (or use --dry-run)")
        spec = prepare_import(args.kind, args.source, clip=args.clip, tokenizer=args.tokenizer, base=args.config,
                              overrides=args.overrides)
        print(f"source: {spec.kind} checkpoint {spec.info.get('source')}")
        for note in spec.notes:
            print(f"note: {note}")
        if args.dry_run:
            plan = plan_conversion(spec)
            print(plan.mapping())
            print(plan.summary())
            print("config:\n" + dump_config(spec.config))
            return 0
        mesh = None
        if args.mesh:
            from pixellm_jax.mesh import make_mesh

            mesh = make_mesh(spec.config.mesh)
        result = convert_checkpoint(spec, args.out, force=args.force, mesh=mesh, progress=not args.no_progress,
                                    allow_nonfinite=args.allow_nonfinite)
        for warning in result.warnings:
            print(f"pixellm convert: warning: {warning}", file=sys.stderr)
        print(result.plan.summary())
        print(f"wrote {args.out}")
        if args.check:
            from pixellm_jax.convert.check import DEFAULT_PROMPT, check_conversion

            report = check_conversion(args.out, result.plan, args.prompt or DEFAULT_PROMPT)
            print(report)
            if not report.passed:
                print(f"pixellm convert: --check failed: {args.out} is not the source's model "
                      "(see the lines above)", file=sys.stderr)
                return 1
    except ConversionError as e:
        print(f"pixellm convert: {e}", file=sys.stderr)
        return 2
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pixellm_jax.convert import exporters

    _quiet_orbax()
    progress = not args.no_progress
    merge = not args.no_merge_lora
    try:
        if args.to == "pixellm":
            result = exporters.export_pixellm(
                args.checkpoint, args.out, merge=merge, dtype=args.dtype or "official",
                max_shard_size=args.max_shard_size or "10GB", force=args.force, progress=progress)
        elif args.to == "llava-hf":
            result = exporters.export_llava_hf(
                args.checkpoint, args.out, merge=merge, dtype=args.dtype or "keep",
                max_shard_size=args.max_shard_size or "5GB", force=args.force, progress=progress)
        else:
            result = exporters.export_peft(args.checkpoint, args.out, base_model=args.base_model, force=args.force)
    except ConversionError as e:
        print(f"pixellm export: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.output}: {', '.join(result.files)}")
    return 0
