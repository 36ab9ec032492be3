"""Scale plan: compile the real train step ahead of time on simulated meshes, read memory and FLOPs.

For each model config, device count, sharding recipe and remat choice, the train step of
`pixellm_jax.train.step` is lowered and compiled for abstract inputs (`jax.ShapeDtypeStruct` with
their shardings: nothing is allocated) on N fake CPU devices. Each device count runs in its own
subprocess, because `--xla_force_host_platform_device_count` must be set before jax is imported.

Per device it reports, in bytes: trainable parameters, optimizer state, frozen parameters (from
the shardings), and XLA's compiled memory analysis — arguments (state + frozen + batch), outputs,
aliased (donated) bytes, temporaries (activations, gathered weights, gradients) and generated code;
`peak` = arguments + temporaries + outputs not aliased to an argument. FLOPs come from XLA's cost
analysis of the partitioned program (per device), summed over devices and divided by the images of
the global batch, against the trainable-aware 6·N·D estimate: 4 FLOPs per frozen and 6 per trained
LLM weight per token (forward, input gradient, weight gradient only where trained), plus attention
(12·layers·T²·hidden per conversation), plus the CLIP forward; the pixel decoder is left out.

The micro-batch is per data-parallel group (official: 2 images, `data.conversations_per_batch`
conversations, `data.model_max_length` text tokens), so the global batch has 2·data·fsdp images
and every device holds the activations of one official micro-batch (or a 1/tensor share of it).

The figures come from XLA:CPU, compiled with its memory-minimising scheduler (see
`MEMORY_SCHEDULER`); XLA:CPU also runs some bf16 work in float32, so temporaries are an upper
bound of what a GPU/TPU compile needs. Full-depth compiles grow with the layer count;
`--extrapolate 2 4` compiles 2- and 4-layer copies instead and extrapolates linearly to the real
depth (memory and FLOPs are affine in the layer count when XLA treats every layer alike; the raw
values are kept in the row as `measured`). On a loaded 2-core machine a 7B or 13B cell so takes
4-5 minutes. Code is generated at LLVM -O0 (`FAST_CODEGEN`; memory and cost analysis are made
before code generation). The configs' LoRA dropout is kept. The step is traced under
`jax.set_mesh(mesh)`, so the model's activation sharding constraints (`sharding.constrain`) apply.

  python tools/scale_plan.py --models pixellm_7b --devices 8 --recipes fsdp --remat full   # one cell
  python tools/scale_plan.py --devices 8 64 256 --out scale.jsonl --markdown scale.md    # the grid
  python tools/scale_plan.py --devices 8 64 256 --extrapolate 2 4                        # the grid, fast
  python tools/scale_plan.py --table scale.jsonl                                         # table of saved rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("fsdp", "data_fsdp", "fsdp_tensor")
# XLA:CPU schedules for concurrency by default and then keeps every layer's gathered weights and
# activations alive at once (7B: 92 GB of temporaries on 8 devices); GPU and TPU compilers schedule
# with a memory limit, so the memory-minimising CPU scheduler is the closer stand-in.
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
REMATS = ("none", "full", "dots")
# Only the plan's numbers are wanted, never the machine code: LLVM at -O0 without its expensive
# passes. Buffer assignment (memory analysis) and cost analysis are made on the optimised HLO,
# before code generation, so they do not change; the generated code size does.
FAST_CODEGEN = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def recipe_mesh(recipe: str, devices: int, tensor: int = 4, group: int = 8):
    """(data, fsdp, tensor) of a named recipe on `devices` devices.

    fsdp: everything sharded over all devices. data_fsdp: FSDP inside groups of `group` devices
    (one host), data parallelism across groups (at least 2). fsdp_tensor: heads/MLP/vocab split
    `tensor` ways, FSDP over the rest.
    """
    from pixellm_jax.config import MeshConfig

    if recipe == "fsdp":
        return MeshConfig(data=1, fsdp=devices, tensor=1)
    if recipe == "data_fsdp":
        data = max(devices // group, 2)
        return MeshConfig(data=data, fsdp=devices // data, tensor=1)
    if recipe == "fsdp_tensor":
        return MeshConfig(data=1, fsdp=devices // tensor, tensor=tensor)
    raise ValueError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")


def _per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs laid out by `shardings`."""
    import jax

    sizes = jax.tree.map(lambda a, s: math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize, abstract, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def _param_counts(cfg, layout) -> dict[str, int]:
    """Parameter counts: all, trainable, LLM matmul weights (all / trained), CLIP."""
    from flax import nnx

    def flat(state):
        return [("/".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(state)]

    train = flat(layout.abstract_state.params)
    frozen = flat(layout.abstract_frozen)
    matmul = lambda p: p.startswith("llm/") and (p.endswith(("kernel", "lora_a", "lora_b")))  # noqa: E731
    size = lambda v: math.prod(v.shape)  # noqa: E731
    return dict(
        all=sum(size(v) for _, v in train + frozen),
        trainable=sum(size(v) for _, v in train),
        llm_matmul=sum(size(v) for p, v in train + frozen if matmul(p)),
        llm_matmul_trainable=sum(size(v) for p, v in train if matmul(p)),
        clip=sum(size(v) for p, v in frozen + train if p.startswith("vision_tower/")),
    )


def estimate_flops(cfg, counts: dict[str, int], images: int, conversations: int, text_len: int) -> float:
    """Trainable-aware 6·N·D for one global batch (see the module docstring)."""
    t, v = cfg.model.text, cfg.model.vision
    seq = text_len + cfg.model.projector.llm_grid ** 2 - 1
    tokens = conversations * seq
    llm = (4 * counts["llm_matmul"] + 2 * counts["llm_matmul_trainable"]) * tokens
    attention = 12 * t.num_layers * seq * seq * t.hidden_size * conversations
    clip = 2 * counts["clip"] * (v.grid ** 2 + 1) * images
    return float(llm + attention + clip)


def abstract_batch(cfg, mesh, images: int, conversations: int, text_len: int) -> dict:
    """ShapeDtypeStructs of a training batch (pipeline schema) with the step's batch shardings."""
    import jax
    import jax.numpy as jnp

    from pixellm_jax.train.mesh import batch_shardings

    s, m = cfg.model.vision.image_size, cfg.model.head.max_targets
    canvas = cfg.data.mask_size or s
    shapes = dict(
        pixels=((images, s, s, 3), jnp.float32), resized_hw=((images, 2), jnp.int32),
        mask_hw=((images, 2), jnp.int32), input_ids=((conversations, text_len), jnp.int32),
        attention_mask=((conversations, text_len), jnp.bool_), labels=((conversations, text_len), jnp.int32),
        conv_image=((conversations,), jnp.int32), conv_valid=((conversations,), jnp.bool_),
        masks=((conversations, m, canvas, canvas), jnp.bool_), mask_valid=((conversations, m), jnp.bool_),
    )
    shardings = batch_shardings(mesh, images, conversations)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k]) for k, (shape, dtype) in shapes.items()}


def plan_step(cfg, mesh_cfg, *, images_per_group: int = 2, convs_per_group: int | None = None,
              text_len: int | None = None, devices=None, compiler_options: dict | None = None) -> dict:
    """Compile the train step of `cfg` on the mesh `mesh_cfg` for abstract inputs; memory and FLOPs.

    The global batch has `images_per_group` images and `convs_per_group` conversations (default
    `data.conversations_per_batch`) of `text_len` tokens (default `data.model_max_length`) per
    data × fsdp group. `compiler_options` go to XLA (e.g. `FAST_CODEGEN`). Returns a flat dict
    (bytes per device, FLOPs, timings).
    """
    import jax

    from pixellm_jax.mesh import make_mesh
    from pixellm_jax.train.mesh import batch_parallelism
    from pixellm_jax.train.optimizer import make_optimizer
    from pixellm_jax.train.state import abstract_with_shardings, state_layout
    from pixellm_jax.train.step import make_train_step

    start = time.perf_counter()
    convs_per_group = convs_per_group or cfg.data.conversations_per_batch
    text_len = text_len or cfg.data.model_max_length
    mesh = make_mesh(mesh_cfg, devices)
    n_dev = mesh.devices.size
    groups = batch_parallelism(mesh)
    images, conversations = images_per_group * groups, convs_per_group * groups
    tx = make_optimizer(cfg.optim)
    layout = state_layout(cfg, mesh, tx)
    state = abstract_with_shardings(layout.abstract_state, layout.state_shardings)
    frozen = abstract_with_shardings(layout.abstract_frozen, layout.frozen_shardings)
    batch = abstract_batch(cfg, mesh, images, conversations, text_len)
    # The trainer's pipeline packs one block per device (`mesh.batch_groups`): gathers stay local.
    step = make_train_step(layout, cfg, tx, mesh, {k: v.sharding for k, v in batch.items()}, image_groups=groups)
    with jax.set_mesh(mesh):  # activation constraints (`sharding.constrain`) need the mesh in context
        lowered = step.lower(state, frozen, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile(compiler_options)
    compile_s = time.perf_counter() - start - lower_s

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_device = float(cost.get("flops", 0.0))
    counts = _param_counts(cfg, layout)
    estimate = estimate_flops(cfg, counts, images, conversations, text_len)
    out = dict(
        config=cfg.name, devices=n_dev, num_layers=cfg.model.text.num_layers, mesh=dict(data=mesh.shape["data"], fsdp=mesh.shape["fsdp"],
                                                     tensor=mesh.shape["tensor"]),
        remat=cfg.model.text.remat, scan_layers=cfg.model.text.scan_layers, dtype=cfg.model.dtype,
        images=images, conversations=conversations, text_len=text_len,
        params=counts["all"], trainable=counts["trainable"],
        trainable_bytes=_per_device_bytes(layout.abstract_state.params, layout.state_shardings.params),
        optimizer_bytes=_per_device_bytes(layout.abstract_state.opt_state, layout.state_shardings.opt_state),
        frozen_bytes=_per_device_bytes(layout.abstract_frozen, layout.frozen_shardings),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops_per_device=flops_device,
        flops_per_image=flops_device * n_dev / images,
        estimate_per_image=estimate / images,
        lower_s=lower_s, compile_s=compile_s, activation_constraints=True,
    )
    out["peak_bytes"] = out["argument_bytes"] + out["temp_bytes"] + max(out["output_bytes"] - out["alias_bytes"], 0)
    out["flops_ratio"] = out["flops_per_image"] / out["estimate_per_image"]
    return out


# Fields of a plan row that grow linearly with the number of LLM layers (everything but the LLM is fixed).
_AFFINE = ("params", "trainable", "trainable_bytes", "optimizer_bytes", "frozen_bytes", "argument_bytes",
           "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "flops_per_device", "flops_per_image",
           "estimate_per_image")


def extrapolate(shallow: dict, deep: dict, layers: int) -> dict:
    """The plan of a `layers`-deep LLM from the plans of two shallower copies of the same model.

    Memory and FLOPs are affine in the layer count (each layer adds the same parameters, optimizer
    state, saved activations and work), so two compiles determine them; compile and lowering
    times are those of the two compiles.
    """
    a, b = shallow["num_layers"], deep["num_layers"]
    measured = {k: [shallow[k], deep[k]] for k in ("argument_bytes", "temp_bytes", "flops_per_device")}
    out = dict(deep, num_layers=layers, extrapolated_from=[a, b], measured=measured,
               lower_s=shallow["lower_s"] + deep["lower_s"], compile_s=shallow["compile_s"] + deep["compile_s"])
    for key in _AFFINE:
        out[key] = deep[key] + (deep[key] - shallow[key]) * (layers - b) / (b - a)
    out["peak_bytes"] = out["argument_bytes"] + out["temp_bytes"] + max(out["output_bytes"] - out["alias_bytes"], 0)
    out["flops_ratio"] = out["flops_per_image"] / out["estimate_per_image"]
    return out


def plan_cell(model: str, recipe: str, remat: str, devices: int, args: argparse.Namespace) -> dict:
    """One cell of the grid: compiled at full depth, or extrapolated from two shallow compiles."""
    from pixellm_jax.config import load_config

    mesh_cfg = recipe_mesh(recipe, devices, args.tensor)
    overrides = [f"model.text.remat={remat}", f"model.text.scan_layers={str(args.scan).lower()}",
                 *args.override]
    kw = dict(images_per_group=args.images, convs_per_group=args.convs, text_len=args.text_len,
              compiler_options=None if args.full_codegen else FAST_CODEGEN)
    cfg = load_config(model, overrides)
    if not args.extrapolate:
        row = plan_step(cfg, mesh_cfg, **kw)
    else:
        shallow, deep = (plan_step(load_config(model, overrides + [f"model.text.num_layers={n}"]), mesh_cfg, **kw)
                         for n in args.extrapolate)
        row = extrapolate(shallow, deep, cfg.model.text.num_layers)
    row["config"], row["recipe"] = model, recipe
    return row


def _worker(args: argparse.Namespace, devices: int) -> list[dict]:
    """Run every requested cell on `devices` devices of this process; one JSON line each, flushed."""
    rows = []
    for model in args.models:
        for recipe in args.recipes:
            for remat in args.remat:
                try:
                    row = plan_cell(model, recipe, remat, devices, args)
                except Exception as e:  # a cell that cannot compile is a result, not the end of the grid
                    row = dict(config=model, devices=devices, recipe=recipe, remat=remat,
                               error=f"{type(e).__name__}: {str(e)[:300]}")
                print("ROW " + json.dumps(row), flush=True)
                rows.append(row)
    return rows


GB = 1e9


def _table(rows: list[dict]) -> list[str]:
    head = ("| config | devices | recipe (data×fsdp×tensor) | remat | images / convs | trainable | optimizer | frozen | "
            "temp | peak/device | GFLOP/image (XLA) | XLA / 6ND | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['devices']} | {r['recipe']} | {r['remat']} | "
                         f"failed: {r['error'][:80]} |" + " |" * 8)
            continue
        m = r["mesh"]
        old = "" if r.get("activation_constraints") else ", no activation constraints"  # rows of older runs
        lines.append(
            f"| {r['config']} | {r['devices']} | {r['recipe']} ({m['data']}×{m['fsdp']}×{m['tensor']}){old} | "
            f"{r['remat']} | {r['images']} / {r['conversations']} | "
            f"{r['trainable_bytes'] / GB:.2f} GB | {r['optimizer_bytes'] / GB:.2f} GB | "
            f"{r['frozen_bytes'] / GB:.2f} GB | {r['temp_bytes'] / GB:.2f} GB | {r['peak_bytes'] / GB:.2f} GB | "
            f"{r['flops_per_image'] / 1e9:,.0f} | {r['flops_ratio']:.2f} | {r['compile_s']:.0f}"
            + (" (extrap. {}→{} layers)".format("+".join(map(str, r["extrapolated_from"])), r["num_layers"])
               if "extrapolated_from" in r else "") + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pixellm_7b", "pixellm_13b"], help="config names or paths")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--remat", nargs="+", default=list(REMATS), choices=REMATS)
    parser.add_argument("--extrapolate", type=int, nargs=2, metavar=("L1", "L2"),
                        help="compile L1- and L2-layer copies of each model and extrapolate to its depth (fast)")
    parser.add_argument("--full-codegen", action="store_true",
                        help="optimise the machine code too (slower compiles; only code_bytes changes)")
    parser.add_argument("--scan", action="store_true", help="model.text.scan_layers=true (faster compiles)")
    parser.add_argument("--tensor", type=int, default=4, help="tensor-parallel size of the fsdp_tensor recipe")
    parser.add_argument("--images", type=int, default=2, help="images per data-parallel group (official: 2)")
    parser.add_argument("--convs", type=int, default=None, help="conversations per group (default: the config's)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: data.model_max_length)")
    parser.add_argument("--override", nargs="*", default=[], help="extra section.field=value overrides")
    parser.add_argument("--xla-flags", default=MEMORY_SCHEDULER,
                        help="extra XLA_FLAGS for the compiles (default: XLA:CPU's memory-minimising scheduler)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per device-count subprocess")
    parser.add_argument("--out", help="append the rows to this JSON-lines file")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--here", action="store_true",
                        help="compile for this host's real devices (e.g. 8 GPUs) instead of simulated CPU ones")
    parser.add_argument("--table", metavar="JSONL", help="only print the table of rows saved by --out (no compile)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.table:
        print("\n".join(_table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line])))
        return

    if args.worker:
        _worker(args, args.worker)
        return

    rows = []
    if args.here:
        import jax

        rows = _worker(args, jax.device_count())
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    for n in [] if args.here else args.devices:
        flags = f"--xla_force_host_platform_device_count={n} {args.xla_flags}".strip()
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        cmd = [sys.executable, str(Path(__file__).resolve()), *_without(forwarded, "--devices"), "--worker", str(n)]
        start = time.perf_counter()
        new = _run_worker(cmd, env, args.timeout, args.out)
        rows += new
        print(f"{n} devices: {len(new)} cells in {time.perf_counter() - start:.0f}s", flush=True)

    lines = _table(rows)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print(json.dumps({"bench": "scale_plan", "rows": rows}))


def _run_worker(cmd: list[str], env: dict, timeout: float, out: str | None) -> list[dict]:
    """Run one worker, collecting (and appending to `out`) each row as soon as it is printed."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # stderr: ours
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    rows = []
    try:
        for line in proc.stdout:
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
                if out:
                    with open(out, "a") as f:
                        f.write(line[4:])
    finally:
        timer.cancel()
        proc.wait()
    if proc.returncode:
        print(f"worker for {cmd[-1]} devices exited with {proc.returncode} (killed after {timeout:.0f}s "
              "if negative)", file=sys.stderr)
    return rows


def _without(argv: list[str], flag: str) -> list[str]:
    """argv minus `flag` and the values that follow it."""
    out, skipping = [], False
    for a in argv:
        if a == flag:
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
