"""Where a decode step of `eval.generate.generate_tokens` spends its time, part by part.

Builds the model of `tools/bench_generate.py` (same size options) and

1. traces one jitted generate call with `jax.profiler` and attributes the self time of every XLA op
   (its time minus that of the ops nested in it) to a part of the model, by the named scopes of
   `models/llama.py` and `eval/generate.py` in the op's metadata: `lm_head`, the KV-cache update,
   attention, the layer matmuls (q/k/v/o projections, MLP), norms and RoPE, sampling, the slicing
   of stacked weights and caches (scan `dynamic_index_in_dim` / restacking, `layer_slices`), plain
   copies, and the decode `while` loop's own control; ops inside the longest top-level `while` (the
   decode loop) count as decode steps, the rest as prefill and setup. A fusion is named by its
   root op, so a fused op's time goes to the scope of its last operation;
2. times sub-programs, each the median of `--repeats` calls: one decode step as its own jit (cache
   donated), fed back in a Python loop, which is what a host round trip per token costs against the
   `while_loop`'s step; the `lm_head` matmul alone; the greedy argmax alone; and an empty
   `while_loop` of the same trip count (loop control alone).

Works on any revision of the package (it uses only `generate_tokens`, `LlamaModel.__call__` and, if
present, `unstack_cache` / `unstacked_layers`): run it with PYTHONPATH pointing at another checkout
to profile that one. Prints a table and one JSON line.

  python tools/profile_generate.py                          # the default bench: 4 x 256, batch 8
  python tools/profile_generate.py --layers 12 --hidden 768 --batch 32
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

if __name__ == "__main__":
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: another checkout wins

import benchlib  # noqa: E402  (tools/)

CATEGORIES = (  # (category, op_name fragments), first match wins
    ("KV-cache update", ("kv_cache_update",)),
    ("lm_head", ("lm_head",)),
    ("sampling", ("sampling",)),
    ("attention", ("/attention/",)),
    ("layer matmuls (q/k/v/o, MLP)", ("qkv_proj", "o_proj", "/mlp/")),
    ("norms, RoPE", ("rms_norm", "/rope/")),
    ("slicing stacked weights / caches", ("layer_slices", "dynamic_index_in_dim", "while/body/while/body/jit("
                                          "dynamic_update_index_in_dim")),
)
COPIES = "copies"
LOOP = "while-loop control"
OTHER = "other (tokens, masks, bookkeeping)"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLED = re.compile(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)")


class Hlo:
    """The instructions of a compiled module's text: opcode, metadata op_name, computation, callees."""

    def __init__(self, text: str):
        self.ops: dict[str, tuple[str, str]] = {}  # name -> (opcode, op_name)
        self.computation_of: dict[str, str] = {}
        self.calls: dict[str, list[str]] = {}  # instruction -> computations it runs
        self.entry = None
        header = re.match(r"HloModule\s+([\w.\-]+)", text)
        self.module = header.group(1) if header else ""
        computation = None
        for line in text.splitlines():
            line = re.sub(r"/\*.*?\*/", "", line)  # tuple types carry /*index=5*/ comments
            if line and not line[0].isspace() and line.rstrip().endswith("{"):
                m = _COMPUTATION.match(line)
                computation = m.group(1) if m else None
                if line.startswith("ENTRY"):
                    self.entry = computation
                continue
            m = _INSTRUCTION.match(line)
            if m and computation is not None:
                name = _OP_NAME.search(line)
                self.ops[m.group(1)] = (m.group(2), name.group(1) if name else "")
                self.computation_of[m.group(1)] = computation
                self.calls[m.group(1)] = _CALLED.findall(line)

    def reachable(self, instruction: str) -> set[str]:
        """The instructions of every computation `instruction` runs, transitively."""
        by_computation: dict[str, list[str]] = {}
        for name, comp in self.computation_of.items():
            by_computation.setdefault(comp, []).append(name)
        seen, todo, out = set(), list(self.calls.get(instruction, [])), set()
        while todo:
            comp = todo.pop()
            if comp in seen:
                continue
            seen.add(comp)
            for name in by_computation.get(comp, []):
                out.add(name)
                todo.extend(self.calls.get(name, []))
        return out

    def decode_loop(self) -> tuple[str | None, set[str]]:
        """The entry computation's `while` that samples tokens (the decode loop) and its instructions."""
        loops = [n for n, (op, _) in self.ops.items() if op == "while" and self.computation_of[n] == self.entry]
        best, best_ops = None, set()
        for n in loops:
            inside = self.reachable(n)
            if any("sampling" in self.ops[i][1] for i in inside) and len(inside) > len(best_ops):
                best, best_ops = n, inside
        return best, best_ops


def category(opcode: str, op_name: str) -> str:
    if opcode == "while":
        return LOOP
    for cat, fragments in CATEGORIES:
        if any(f in op_name for f in fragments):
            return cat
    if opcode == "copy":
        return COPIES
    return OTHER


def trace_events(fn, logdir: str, module: str) -> list[dict]:
    """The complete ('X') events of the XLA ops of `module` in one traced call of `fn`."""
    import glob

    import jax

    with jax.profiler.trace(logdir):
        fn()
    (path,) = sorted(glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True))[-1:]
    events = json.load(gzip.open(path))["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
            and e["args"].get("hlo_module", "") == module]


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, its duration minus that of the events nested in it on the same thread)."""
    out = []
    by_thread: dict[object, list[dict]] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, its children's duration]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done, children = stack.pop()
                out.append((done, done["dur"] - children))
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        out.extend((done, done["dur"] - children) for done, children in reversed(stack))
    return out


def breakdown(events: list[dict], hlo: Hlo, steps: int) -> dict:
    """Per-category microseconds per decode step and outside the decode loop, from traced events.

    A `while` body may run on other threads than the `while` op's own event, so the decode loop's
    ops are found in the HLO (every instruction its body runs) and its wall time is the span of
    their events.
    """
    _, decode_ops = hlo.decode_loop()
    per_step, outside = Counter(), Counter()
    first, last = float("inf"), 0.0
    for e, own in self_times(events):
        name = e["args"]["hlo_op"]
        opcode, op_name = hlo.ops.get(name, ("?", ""))
        cat = category(opcode, op_name)
        if name in decode_ops:
            per_step[cat] += own / steps
            first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
        else:
            outside[cat] += own
    loop_us = last - first if decode_ops and last else None
    return {"decode_loop_us": loop_us, "step_us": loop_us / steps if loop_us else None,
            "per_step_us": dict(per_step.most_common()), "outside_loop_us": dict(outside.most_common())}


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        seconds, _ = benchlib.timed(fn)
        times.append(seconds)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32009)
    ap.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True)
    benchlib.add_arguments(ap, repeats=20)
    args = ap.parse_args(argv)
    pinned = benchlib.pin_threads(args.threads)
    load = benchlib.LoadRecord()
    load.warn()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import pixellm_jax
    from bench_generate import bench_config
    from pixellm_jax.eval.generate import SamplingConfig, generate_tokens
    from pixellm_jax.models.llama import LlamaModel
    from pixellm_jax.tokens import IMAGE_TOKEN
    from tests.eval.tiny import random_model

    cfg = bench_config(args)
    model = random_model(cfg, seed=0)
    model.llm.lm_head.kernel.set_value(model.llm.lm_head.kernel[...] * 4)
    rng = np.random.default_rng(0)
    b, t, n = args.batch, args.prompt_len, args.new_tokens
    ids = rng.integers(3, args.vocab - 6, size=(b, t)).astype(np.int32)
    ids[:, 0], ids[:, 2] = 1, IMAGE_TOKEN
    s = cfg.model.vision.image_size
    pixels = jnp.asarray(rng.normal(size=(b, s, s, 3)).astype(np.float32))
    images = jax.block_until_ready(nnx.jit(lambda m, p, r: m.encode_images(p, r))(
        model, pixels, jnp.full((b, 2), s, jnp.int32)))
    args_in = (jnp.asarray(ids), jnp.ones((b, t), bool), jnp.arange(b, dtype=jnp.int32))
    sampling = SamplingConfig(max_new_tokens=n)
    graphdef, state = nnx.split(model)  # jax.jit of the state, as eval.runner runs generation
    gen = jax.jit(lambda state, *a, **kw: generate_tokens(nnx.merge(graphdef, state), *a, **kw),
                  static_argnames=("eos_id", "pad_id", "sampling"))

    def call():
        return jax.block_until_ready(gen(state, images, *args_in, sampling=sampling, eos_id=-1, pad_id=0))

    call()
    whole_s = median_seconds(call, max(3, args.repeats // 4))
    compiled = gen.lower(state, images, *args_in, sampling=sampling, eos_id=-1, pad_id=0).compile()
    hlo = Hlo(compiled.as_text())
    with tempfile.TemporaryDirectory() as logdir:
        parts = breakdown(trace_events(call, logdir, hlo.module), hlo, n - 1)

    # Sub-programs on the same weights and shapes.
    llm = model.llm
    n_img = images.llm_tokens.shape[1]
    max_len = t + n_img - 1 + n
    unstacked = hasattr(LlamaModel, "unstack_cache")
    cache = llm.init_cache(b, max_len)
    cache = cache._replace(mask=cache.mask.at[:, : t + n_img - 1].set(True), index=jnp.asarray(t + n_img - 1, jnp.int32))
    llm_def, llm_state = nnx.split(llm)
    if unstacked:
        cache = LlamaModel.unstack_cache(cache)
        layers_def, layers_state = nnx.split(llm.unstacked_layers())  # sliced once, eagerly

        def one_step(s, ls, tok, pos, c):
            return nnx.merge(llm_def, s)(tok, None, pos, c, layers=nnx.merge(layers_def, ls))

        step = jax.jit(one_step, donate_argnums=(4,))
        step_args = (llm_state, layers_state)
    else:
        step = jax.jit(lambda s, tok, pos, c: nnx.merge(llm_def, s)(tok, None, pos, c), donate_argnums=(3,))
        step_args = (llm_state,)
    argmax = jax.jit(lambda logits: jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None])
    positions = jnp.full((b, 1), t + n_img - 1, jnp.int32)

    def python_loop(steps: int):
        nonlocal cache
        tok = jnp.ones((b, 1), jnp.int32)
        for _ in range(steps):
            out = step(*step_args, tok, positions, cache)
            cache = out.cache._replace(index=jnp.asarray(t + n_img - 1, jnp.int32))  # stay within max_len
            tok = argmax(out.logits)
        return jax.block_until_ready(tok)

    loop_steps = 16
    python_step_s = median_seconds(lambda: python_loop(loop_steps), max(3, args.repeats // 4)) / loop_steps
    hidden = jax.random.normal(jax.random.key(0), (b, cfg.model.text.hidden_size), jnp.float32)
    kernel = llm.lm_head.kernel[...]
    lm_head = jax.jit(lambda h, w: h @ w)
    lm_head_s = median_seconds(lambda: jax.block_until_ready(lm_head(hidden, kernel)), args.repeats)
    logits = lm_head(hidden, kernel)
    greedy = jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32))
    argmax_s = median_seconds(lambda: jax.block_until_ready(greedy(logits)), args.repeats)
    probe = hidden[:, :4]
    nnx_call = nnx.jit(lambda m, x: x + 1)  # the per-call cost of nnx.jit on this model: graph walk + copies
    nnx_call_s = median_seconds(lambda: jax.block_until_ready(nnx_call(model, probe)), max(3, args.repeats // 4))
    plain_call = jax.jit(lambda s, x: x + 1)
    plain_call_s = median_seconds(lambda: jax.block_until_ready(plain_call(state, probe)), args.repeats)
    empty_loop = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < n - 1, lambda c: (c[0] + 1, c[1] + 1),
                                                      (jnp.zeros((), jnp.int32), x))[1])
    tokens0 = jnp.zeros((b,), jnp.int32)
    empty_loop_s = median_seconds(lambda: jax.block_until_ready(empty_loop(tokens0)), args.repeats) / (n - 1)
    load.finish()

    step_us = parts["step_us"]
    per_step = parts["per_step_us"]
    op_total = sum(per_step.values())
    print(f"package {Path(pixellm_jax.__file__).parent}; LLM {args.layers}x{args.hidden}, vocab {args.vocab}, "
          f"batch {b}, {t} text + {n_img} image tokens, {n} new tokens; "
          f"{'unstacked decode' if unstacked else 'stacked cache'}; {pinned['threads']} threads")
    print(f"whole generate call: {whole_s * 1e3:.1f} ms = {b * n / whole_s:.0f} tokens/s; decode loop "
          f"{parts['decode_loop_us'] / 1e3:.1f} ms = {step_us / 1e3:.3f} ms per step (traced)")
    print(f"{'per decode step (op self time)':<40}{'us':>9}{'share':>8}")
    for cat, us in per_step.items():
        print(f"  {cat:<38}{us:>9.1f}{us / op_total:>8.1%}")
    outside = parts["outside_loop_us"]
    print(f"outside the decode loop (prefill, setup): {sum(outside.values()) / 1e3:.1f} ms op time; "
          + ", ".join(f"{k} {v / 1e3:.1f}" for k, v in list(outside.items())[:5]))
    print(f"sub-programs: decode step as its own jit in a Python loop {python_step_s * 1e3:.3f} ms/step "
          f"(vs {step_us / 1e3:.3f} in the while_loop: {python_step_s * 1e6 - step_us:+.0f} us host round trip); "
          f"lm_head matmul alone {lm_head_s * 1e3:.3f} ms; argmax alone {argmax_s * 1e3:.3f} ms; "
          f"empty while_loop {empty_loop_s * 1e6:.1f} us/iteration; a trivial call taking the model: nnx.jit "
          f"{nnx_call_s * 1e3:.2f} ms, jax.jit of its split state {plain_call_s * 1e3:.2f} ms")
    print(f"load average {load.before:.2f} before, {load.after:.2f} after")
    load.warn()
    report = {"bench": "profile_generate", "package": str(Path(pixellm_jax.__file__).parent),
              "unstacked_decode": unstacked, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
              "batch": b, "new_tokens": n, "pinned": pinned, **load.as_dict(),
              "whole_call_s": round(whole_s, 4), "tokens_per_s": round(b * n / whole_s, 1),
              "decode_step_us": round(step_us, 1),
              "per_step_us": {k: round(v, 1) for k, v in per_step.items()},
              "outside_loop_us": {k: round(v, 1) for k, v in outside.items()},
              "python_loop_step_us": round(python_step_s * 1e6, 1), "lm_head_alone_us": round(lm_head_s * 1e6, 1),
              "argmax_alone_us": round(argmax_s * 1e6, 1), "empty_while_iteration_us": round(empty_loop_s * 1e6, 2),
              "nnx_jit_call_ms": round(nnx_call_s * 1e3, 3), "jax_jit_call_ms": round(plain_call_s * 1e3, 3)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
