"""Generation throughput: our batched KV-cache generator vs transformers `generate`, and vs recomputation.

Four ways of producing the same greedy tokens for one batch of prompts, fp32, from the same weights,
on JAX's default device and `--torch-device` (default cpu):
  ours, LLM        `eval.generate.generate_tokens` jitted on precomputed image features: prefill +
                   a `while_loop` of KV-cached steps — the same work as transformers below;
                   jitted as `pixellm eval` runs it (`jax.jit` of the model state, split once);
  transformers     `LlamaForCausalLM.generate(use_cache=True)` with our LLM's weights copied in and our
                   spliced prompt embeddings (`inputs_embeds`): the LLM alone, no CLIP, no masks;
  ours, full       `eval.generate.generate` jitted: CLIP + projectors + prefill + cached steps + the
                   masks of every codebook group (one decoder call);
  recompute        `eval.recompute.generate_by_recomputation`: the official approach, the full
                   forward (CLIP included) over the whole sequence for every new token.
The speedups are transformers / ours-LLM and recompute / ours-full.

Fair under noise (`tools/benchlib.py`): both libraries are pinned to the same CPUs and thread
count (`--threads`, default all: the affinity mask sizes XLA's pool, `torch.set_num_threads` torch's);
after one untimed warm-up call each (compilation, reported as `first_call_s`) the systems run
interleaved, `--repeats` timed calls each (recomputation `--recompute-repeats`), and medians are
compared, with the spread and the per-round paired ratios beside them; the load average before and
after is in the JSON line, with a warning when the machine was not idle at the start.
End-of-sequence is disabled so every row produces exactly --new-tokens tokens; tokens/s counts
batch x new tokens over the median wall time of one call. The token sequences of the systems are
compared. Prints a table and one JSON line.

  python tools/bench_generate.py                       # 8 x (64 image + 48 text) prompts, 64 new tokens
  python tools/bench_generate.py --layers 12 --hidden 768 --batch 32 --recompute-repeats 0
  python tools/bench_generate.py --threads 1 --repeats 9
  python tools/bench_generate.py --torch-device cuda --layers 12 --hidden 768   # GPU host: both on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402  (tools/benchlib.py: the script's directory is on sys.path)
import roofline  # noqa: E402  (tools/roofline.py)


OURS_LLM = "ours, LLM only (KV cache, jit)"
HF = "transformers generate (KV cache, LLM only)"
OURS_FULL = "ours, full (+ CLIP + masks)"
RECOMPUTE = "full recomputation (official, + CLIP)"


def bench_config(args, extra: tuple[str, ...] | list[str] = ()):
    """A small but LLaMA-shaped PixelLM (fp32, no LoRA) derived from configs/tiny.yaml (`extra`: more overrides)."""
    from pixellm_jax.config import load_config
    from pixellm_jax.eval.loading import inference_config

    heads = args.hidden // 64
    overrides = [
        "model.vision.hidden_size=256", "model.vision.intermediate_size=1024", "model.vision.num_layers=4",
        "model.vision.num_heads=4", "model.vision.image_size=224", "model.vision.pretrained_image_size=224",
        "model.projector.llm_grid=8",
        f"model.text.vocab_size={args.vocab}", f"model.text.hidden_size={args.hidden}",
        f"model.text.intermediate_size={int(args.hidden * 2.75)}", f"model.text.num_layers={args.layers}",
        f"model.text.num_heads={heads}", f"model.text.num_kv_heads={heads}",
        "model.text.max_position_embeddings=4096", "model.lora.enabled=false",
        "model.head.out_dim=64", "model.head.decoder_heads=4", "model.head.decoder_mlp_dim=256",
        f"model.text.scan_layers={str(args.scan_layers).lower()}", *extra,
    ]
    return inference_config(load_config("tiny", overrides))


def to_transformers(llm, cfg):
    """A transformers LlamaForCausalLM holding the weights of our `LlamaModel`."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.model.text
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False,
    )).eval()

    def arr(v):
        return torch.from_numpy(np.array(v[...], np.float32))

    sd = {"model.embed_tokens.weight": arr(llm.embed_tokens.embedding), "model.norm.weight": arr(llm.norm.weight),
          "lm_head.weight": arr(llm.lm_head.kernel).T}
    layers = llm.layers
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arr(layers.input_layernorm.weight)[i]
        sd[p + "post_attention_layernorm.weight"] = arr(layers.post_attention_layernorm.weight)[i]
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                sd[f"{p}{sub}.{name}.weight"] = arr(getattr(getattr(layers, sub), name).kernel)[i].T
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return hf


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48, help="text tokens per prompt (plus 64 image tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32009)
    benchlib.add_arguments(ap, repeats=5)
    ap.add_argument("--recompute-repeats", type=int, default=3, help="timed recomputation runs (0: skip it)")
    ap.add_argument("--skip-recompute", action="store_true", help="same as --recompute-repeats 0")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds of sleep before each timed call (default none: on this VM an idle pause "
                         "lowers the clocks, and a short call then pays for the ramp-up: 0.5 s made ours ~25%% slower)")
    ap.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                    help="model.text.scan_layers (same parameters either way; generation runs the layers one "
                         "by one over pre-sliced weights whatever it says, so it only matters to the baselines)")
    ap.add_argument("--torch-device", default="cpu",
                    help="where transformers runs (cpu, cuda); ours runs on JAX's default device")
    ap.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                    help="measure this machine's read bandwidth and matmul rate (XLA, torch, NumPy; ~5 s) and "
                         "report the least time any fp32 generator could take here (tools/roofline.py)")
    args = ap.parse_args(argv)
    pinned = benchlib.pin_threads(args.threads)  # before the first JAX computation
    load = benchlib.LoadRecord()
    load.warn()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from pixellm_jax.eval.generate import SamplingConfig, generate, generate_tokens
    from pixellm_jax.eval.recompute import generate_by_recomputation
    from pixellm_jax.models.multimodal import splice_image_tokens
    from pixellm_jax.tokens import IMAGE_TOKEN
    from tests.eval.tiny import random_model

    jax_on_cpu, jax_device = jax.default_backend() == "cpu", jax.devices()[0].device_kind
    if not jax_on_cpu:
        jax.config.update("jax_default_matmul_precision", "highest")  # fp32 dots, as torch's default, not TF32
    cfg = bench_config(args)
    model = random_model(cfg, seed=0)
    model.llm.lm_head.kernel.set_value(model.llm.lm_head.kernel[...] * 4)  # varied greedy tokens
    rng = np.random.default_rng(0)
    b, t, n = args.batch, args.prompt_len, args.new_tokens
    ids = rng.integers(3, args.vocab - 6, size=(b, t)).astype(np.int32)
    ids[:, 0], ids[:, 2] = 1, IMAGE_TOKEN
    mask = np.ones((b, t), bool)
    s = cfg.model.vision.image_size
    pixels = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    resized = np.full((b, 2), s, np.int32)  # unpadded images: no masked image tokens, as HF sees them
    conv = np.arange(b, dtype=np.int32)
    inputs = [jnp.asarray(x) for x in (pixels, resized, ids, mask, conv)]
    no_eos = dict(eos_id=-1, pad_id=0)
    sampling = SamplingConfig(max_new_tokens=n)

    @nnx.jit
    def features(model, pixels, resized, ids, mask, conv):
        images = model.encode_images(pixels, resized)
        spliced = splice_image_tokens(model.llm.embed(jnp.maximum(ids, 0)), ids, mask, images.llm_tokens[conv],
                                      images.llm_mask[conv])
        return images, spliced.embeds

    images, prompt = jax.block_until_ready(features(model, *inputs))
    # As `eval.runner.BatchRunner` runs them: jax.jit of the model's state, split once (an nnx.jit
    # call walks the model's graph and copies every weight on each call).
    graphdef, state = nnx.split(model)

    def jitted(fn):
        return jax.jit(lambda state, *a, **kw: fn(nnx.merge(graphdef, state), *a, **kw),
                       static_argnames=("eos_id", "pad_id", "sampling"))

    llm_fn, full_fn = jitted(generate_tokens), jitted(generate)
    device = torch.device(args.torch_device)
    hf = to_transformers(model.llm, cfg).to(device)
    prompt = torch.from_numpy(np.array(prompt)).to(device)
    attention = torch.ones(prompt.shape[:2], dtype=torch.long, device=device)

    def transformers_generate():
        with torch.no_grad():
            out = hf.generate(inputs_embeds=prompt, attention_mask=attention, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the call is timed to its last kernel, as block_until_ready does ours
        return out

    systems = {
        OURS_LLM: lambda: jax.block_until_ready(
            llm_fn(state, images, inputs[2], inputs[3], inputs[4], sampling=sampling, **no_eos)),
        HF: transformers_generate,
        OURS_FULL: lambda: jax.block_until_ready(full_fn(state, *inputs, sampling=sampling, **no_eos)),
        # (its final masks come back asynchronously: wait for them, or they would run into the next system)
        RECOMPUTE: lambda: jax.block_until_ready(generate_by_recomputation(model, *inputs, max_new_tokens=n, **no_eos)),
    }
    recompute_repeats = 0 if args.skip_recompute else args.recompute_repeats
    repeats = {OURS_LLM: args.repeats, HF: args.repeats, OURS_FULL: args.repeats, RECOMPUTE: recompute_repeats}
    # The roofline measures this host's CPU: it bounds a run only where both sides run there.
    on_cpu = jax_on_cpu and device.type == "cpu"
    machine = roofline.measure_machine() if args.roofline and on_cpu else None
    run = benchlib.interleave(systems, repeats, pause=args.pause)
    load.finish()

    ours_tokens = np.asarray(run.results[OURS_LLM].tokens)
    hf_tokens = run.results[HF][:, -n:].cpu().numpy()
    full_tokens = np.asarray(run.results[OURS_FULL].tokens)
    recompute_tokens = np.asarray(run.results[RECOMPUTE].tokens) if recompute_repeats else None

    total = b * n
    print(f"batch {b}, prompt {t} text + {cfg.model.projector.llm_grid ** 2} image tokens, {n} new tokens; "
          f"LLM {args.layers}x{args.hidden} ({'scanned' if args.scan_layers else 'looped'} layers), vocab {args.vocab}; "
          f"fp32, JAX on {jax_device}, transformers on {device} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{pinned['threads']} threads each, CPUs {pinned['cpus']}, torch {pinned['torch_threads']})")
    print(f"{'system':<44}{'first call s':>14}{'median s':>10}{'min s':>8}{'max s':>8}{'runs':>6}{'tokens/s':>10}")
    result = {}
    for name, times in run.times.items():
        if not times:
            continue
        st = benchlib.summary(times)
        print(f"{name:<44}{run.first_call[name]:>14.2f}{st['median']:>10.3f}{st['min']:>8.3f}{st['max']:>8.3f}"
              f"{st['n']:>6}{total / st['median']:>10.1f}")
        result[name] = {"first_call_s": round(run.first_call[name], 3), "seconds": st,
                        "tokens_per_s": round(total / st["median"], 1)}
    vs_hf = benchlib.ratio(run.times[HF], run.times[OURS_LLM])
    vs_rec = benchlib.ratio(run.times[RECOMPUTE], run.times[OURS_FULL]) if recompute_repeats else None
    equal = {"transformers": float((hf_tokens == ours_tokens).mean()),
             "ours_full": float((full_tokens == ours_tokens).mean()),
             "recompute": None if recompute_tokens is None else float((recompute_tokens == ours_tokens).mean())}
    print(f"speedup vs transformers (LLM only): {vs_hf['median_ratio']:.2f}x "
          f"(paired rounds {vs_hf['paired_min']:.2f}-{vs_hf['paired_max']:.2f}x)"
          + (f"; vs full recomputation (with CLIP and masks): {vs_rec['median_ratio']:.1f}x" if vs_rec else
             "; recomputation skipped"))
    print(f"fraction of greedy tokens equal to ours: {equal}")
    bound = where = None
    if machine:
        prompt_tokens = t + cfg.model.projector.llm_grid ** 2 - 1
        bound = roofline.generation_bound(cfg.model.text, b, prompt_tokens, n, machine)
        where = roofline.against(bound, statistics.median(run.times[OURS_LLM]), statistics.median(run.times[HF]))
        print(f"roofline: this machine reads {machine['best_read_gb_s']} GB/s and multiplies at "
              f"{machine['best_matmul_gflop_s']} GFLOP/s at best ({machine}); {bound['weights_mb']} MB of weights "
              f"per step: no fp32 generator can take less than {bound['total_s']:.3f} s (prefill "
              f"{bound['prefill_s']:.3f} s + decode {bound['decode_s']:.3f} s); ours runs at "
              f"{where['ours_of_bound']:.0%} of that bound, and the largest ratio any implementation could show "
              f"against transformers here is {where['max_speedup_vs_other']:.2f}x")
    elif args.roofline:
        print("roofline: skipped (it measures this host's CPU; JAX or transformers runs elsewhere)")
    print(f"load average {load.before:.2f} before, {load.after:.2f} after"
          + ("" if load.idle else f" (NOT idle: above {benchlib.IDLE_LOAD} at the start)"))
    load.warn()
    report = {
        "bench": "generate", "batch": b, "prompt_tokens": t + cfg.model.projector.llm_grid ** 2 - 1, "new_tokens": n,
        "llm_layers": args.layers, "llm_hidden": args.hidden, "vocab": args.vocab, "scan_layers": args.scan_layers,
        "cpu_count": os.cpu_count(), "pinned": pinned, **load.as_dict(),
        "jax_device": jax_device, "torch_device": str(device),
        "jax": jax.__version__, "torch": torch.__version__, "systems": result,
        "speedup_vs_transformers": vs_hf["median_ratio"], "vs_transformers": vs_hf,
        "speedup_vs_recompute": None if vs_rec is None else vs_rec["median_ratio"], "vs_recompute": vs_rec,
        "tokens_equal": equal, "machine": machine, "bound": bound, "against_bound": where,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
