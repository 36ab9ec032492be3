"""Generation throughput: our batched KV-cache generator vs transformers `generate`, and vs recomputation.

Four ways of producing the same greedy tokens for one batch of prompts, all on this machine's CPU,
fp32, from the same weights:
  ours, LLM        `eval.generate.generate_tokens` jitted on precomputed image features: prefill +
                   a `while_loop` of KV-cached steps — the same work as transformers below;
  transformers     `LlamaForCausalLM.generate(use_cache=True)` with our LLM's weights copied in and our
                   spliced prompt embeddings (`inputs_embeds`): the LLM alone, no CLIP, no masks;
  ours, full       `eval.generate.generate` jitted: CLIP + projectors + prefill + cached steps + the
                   masks of every codebook group (one decoder call);
  recompute        `eval.recompute.generate_by_recomputation`: the official approach, the full
                   forward (CLIP included) over the whole sequence for every new token.
The speedups are transformers / ours-LLM and recompute / ours-full.
End-of-sequence is disabled so every row produces exactly --new-tokens tokens; tokens/s counts
batch x new tokens over the wall time of one call after a warm-up call (so compilation is excluded
and reported separately). The token sequences of the three are compared. Prints a table and one
JSON line.

  python tools/bench_generate.py                       # 8 x (64 image + 48 text) prompts, 64 new tokens
  python tools/bench_generate.py --batch 4 --new-tokens 128 --layers 12 --hidden 768 --no-scan-layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


OURS_LLM = "ours, LLM only (KV cache, jit)"
HF = "transformers generate (KV cache, LLM only)"
OURS_FULL = "ours, full (+ CLIP + masks)"
RECOMPUTE = "full recomputation (official, + CLIP)"


def bench_config(args):
    """A small but LLaMA-shaped PixelLM (fp32, no LoRA) derived from configs/tiny.yaml."""
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
        f"model.text.scan_layers={str(args.scan_layers).lower()}",
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


def timed(fn, repeats: int):
    """(first call seconds, best of `repeats` later calls, last result)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return first, best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48, help="text tokens per prompt (plus 64 image tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32009)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                    help="run the LLM layers with nnx.scan (model.text.scan_layers; same parameters either way)")
    ap.add_argument("--skip-recompute", action="store_true")
    args = ap.parse_args()

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
    rows = {}

    @nnx.jit
    def features(model, pixels, resized, ids, mask, conv):
        images = model.encode_images(pixels, resized)
        spliced = splice_image_tokens(model.llm.embed(jnp.maximum(ids, 0)), ids, mask, images.llm_tokens[conv],
                                      images.llm_mask[conv])
        return images, spliced.embeds

    images, prompt = jax.block_until_ready(features(model, *inputs))
    llm_fn = nnx.jit(generate_tokens, static_argnames=("eos_id", "pad_id", "sampling"))
    first, best, out = timed(lambda: jax.block_until_ready(
        llm_fn(model, images, inputs[2], inputs[3], inputs[4], sampling=sampling, **no_eos)), args.repeats)
    ours_tokens = np.asarray(out.tokens)
    rows[OURS_LLM] = (first, best)

    hf = to_transformers(model.llm, cfg)
    prompt = torch.from_numpy(np.array(prompt))

    def transformers_generate():
        with torch.no_grad():
            return hf.generate(inputs_embeds=prompt, attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
                               max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               eos_token_id=None, pad_token_id=0)

    first, best, hf_out = timed(transformers_generate, args.repeats)
    rows[HF] = (first, best)
    hf_tokens = hf_out[:, -n:].numpy()

    full_fn = nnx.jit(generate, static_argnames=("eos_id", "pad_id", "sampling"))
    first, best, out = timed(lambda: jax.block_until_ready(full_fn(model, *inputs, sampling=sampling, **no_eos)),
                             args.repeats)
    full_tokens = np.asarray(out.tokens)
    rows[OURS_FULL] = (first, best)

    recompute_tokens = None
    if not args.skip_recompute:
        first, best, rec = timed(lambda: generate_by_recomputation(model, *inputs, max_new_tokens=n, **no_eos), 1)
        recompute_tokens = np.asarray(rec.tokens)
        rows[RECOMPUTE] = (first, best)

    total = b * n
    print(f"batch {b}, prompt {t} text + {cfg.model.projector.llm_grid ** 2} image tokens, {n} new tokens; "
          f"LLM {args.layers}x{args.hidden} ({'scanned' if args.scan_layers else 'looped'} layers), vocab {args.vocab}; "
          f"fp32 on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores)")
    print(f"{'system':<44}{'first call s':>14}{'best s':>10}{'tokens/s':>12}")
    result = {}
    for name, (first, best) in rows.items():
        print(f"{name:<44}{first:>14.2f}{best:>10.3f}{total / best:>12.1f}")
        result[name] = {"first_call_s": round(first, 3), "best_s": round(best, 4), "tokens_per_s": round(total / best, 1)}
    vs_hf = rows[HF][1] / rows[OURS_LLM][1]
    vs_rec = None if recompute_tokens is None else rows[RECOMPUTE][1] / rows[OURS_FULL][1]
    equal = {"transformers": float((hf_tokens == ours_tokens).mean()), "ours_full": float((full_tokens == ours_tokens).mean()),
             "recompute": None if recompute_tokens is None else float((recompute_tokens == ours_tokens).mean())}
    print(f"speedup: {vs_hf:.2f}x vs transformers (LLM only), "
          + (f"{vs_rec:.2f}x vs full recomputation (with CLIP and masks)" if vs_rec else "recomputation skipped"))
    print(f"fraction of greedy tokens equal to ours: {equal}")
    print(json.dumps({
        "bench": "generate", "batch": b, "prompt_tokens": t + cfg.model.projector.llm_grid ** 2 - 1, "new_tokens": n,
        "llm_layers": args.layers, "llm_hidden": args.hidden, "vocab": args.vocab, "scan_layers": args.scan_layers,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "torch": torch.__version__, "systems": result,
        "speedup_vs_transformers": round(vs_hf, 2), "speedup_vs_recompute": None if vs_rec is None else round(vs_rec, 2),
        "tokens_equal": equal,
    }))


if __name__ == "__main__":
    main()
