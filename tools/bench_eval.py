"""Evaluation throughput: `pixellm eval`'s batched MUSE generation vs the official loop (batch 1, no cache).

One model, one MUSE-layout split (written by `tests/muse_layout.py` into a temporary directory: each
record an image with two questions), greedy decoding with the same `--max-new-tokens`, scored the
same way:
  ours      `eval.evaluate.run_eval`, what `pixellm eval` runs once its checkpoint is loaded: batches
            of `--rows` questions over up to `--images` images, each batch one jitted program (CLIP,
            prefill, KV-cached decode loop, masks of the generated [SEG] groups, post-processing),
            then Hungarian matching, the MUSE metrics and the per-sample files;
  official  the same `run_eval` on batches of ONE question, each answered by
            `eval.recompute.generate_by_recomputation`: the full forward (CLIP included) over the whole
            sequence for every new token, as the official `evaluate` runs HF `generate` without a
            cache; then the same post-processing, matching, metrics and files.
The model is random but its LM head is rewired (`tests/eval/tiny.chain_answers`) so every answer is
`--answer-words` words, one [SEG] group and "." then </s>, while attention still mixes in the
context: answers of a known length, each with a mask to match.

Fair under noise (`tools/benchlib.py`): both sides run in this process on the same `--threads` CPUs,
each pass over the split after one untimed warm-up pass (compilation), interleaved `--repeats`
times; medians are compared with the spread and the paired ratios; the load average before and after
is in the JSON line, with a warning when the machine was not idle. Prints a table and one JSON line.

  python tools/bench_eval.py                         # bench-size model (LLM 4 x 256, CLIP 4 x 256 at 224 px)
  python tools/bench_eval.py --records 32 --rows 16 --images 16
  python tools/bench_eval.py --size tiny --records 2 --repeats 1   # the tests' tiny model (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402  (tools/benchlib.py: the script's directory is on sys.path)

OURS = "ours: pixellm eval (batched, KV cache, jit)"
OFFICIAL = "official loop (batch 1, recomputation)"


def model_config(size: str, hf, seg, args):
    """The tiny config of the tests, or bench_generate's LLaMA-shaped one, with the tokenizer's vocabulary."""
    from pixellm_jax.config import load_config
    from pixellm_jax.eval.loading import inference_config

    base = [f"model.text.vocab_size={len(hf)}", f"model.head.seg_token_ids={seg}", "model.head.decoder_depth=1"]
    if size == "tiny":
        return inference_config(load_config("tiny", base))
    from bench_generate import bench_config

    bench = argparse.Namespace(hidden=args.hidden, layers=args.layers, vocab=len(hf), scan_layers=True)
    return bench_config(bench, extra=base)


def chain_model(cfg, legacy, words: int, seed: int = 0):
    """A random PixelLM whose greedy answer to any question is `words` words, [SEG] and "." then </s>."""
    from pixellm_jax.data.conversation import tokenize_generation
    from tests.eval.tiny import chain_answers, random_model

    model = random_model(cfg, seed=seed)
    colon = int(tokenize_generation(legacy, "<image>\nx")[-1])  # the prompt's last token ("ASSISTANT:")
    tail = legacy.encode_chunk(" [SEG].")
    used = {colon, legacy.eos_id, legacy.pad_id, legacy.bos_id, *tail, *cfg.model.head.seg_ids(cfg.model.text.vocab_size)}
    vocab = [i for i in range(3, cfg.model.text.vocab_size) if i not in used]
    if words > len(vocab):
        raise ValueError(f"--answer-words {words}: only {len(vocab)} distinct tokens available")
    answer = [*vocab[:words], *tail, legacy.eos_id]
    chain_answers(model, dict(zip([colon, *answer[:-1]], answer)))
    return model


class RecomputeRunner:
    """A `BatchRunner` stand-in whose generation is the official full recomputation (one device)."""

    def __init__(self, model):
        import jax

        from pixellm_jax.postprocess import target_masks

        self.model = model
        self.cfg = model.cfg
        self.local_devices = 1
        self._masks = jax.jit(lambda *a: target_masks(*a)[0], static_argnums=(4, 5, 6))

    def generate(self, batch, sampling, eos_id: int, pad_id: int, key=None) -> dict:
        import numpy as np

        from pixellm_jax.eval.recompute import generate_by_recomputation

        if sampling.temperature != 0:
            raise ValueError("the official loop is greedy: use temperature 0")
        a = batch.arrays
        out = generate_by_recomputation(self.model, a["pixels"], a["resized_hw"], a["input_ids"], a["attention_mask"],
                                        a["conv_image"], eos_id=int(eos_id), pad_id=int(pad_id),
                                        max_new_tokens=sampling.max_new_tokens)
        masks = self._masks(out.mask_logits, a["resized_hw"], a["original_hw"], a["conv_image"], batch.out_hw,
                            self.cfg.vision.image_size, batch.groups)
        return {"tokens": np.asarray(out.tokens), "lengths": np.asarray(out.lengths), "mask_logits": np.asarray(masks),
                "num_targets": np.asarray(out.seg.num_targets), "malformed": np.asarray(out.seg.malformed),
                "overflow": np.asarray(out.seg.overflow)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("bench", "tiny"), default="bench", help="model size (see above)")
    ap.add_argument("--hidden", type=int, default=256, help="LLM hidden size (bench size)")
    ap.add_argument("--layers", type=int, default=4, help="LLM layers (bench size)")
    ap.add_argument("--records", type=int, default=16, help="MUSE records (images) in the split; 2 questions each")
    ap.add_argument("--image-px", type=int, default=64, help="side of the split's images")
    ap.add_argument("--rows", type=int, default=8, help="questions per batch (ours)")
    ap.add_argument("--images", type=int, default=8, help="images per batch (ours)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--answer-words", type=int, default=24, help="words before each answer's [SEG] group")
    benchlib.add_arguments(ap, repeats=3)
    args = ap.parse_args(argv)
    pinned = benchlib.pin_threads(args.threads)  # before the first JAX computation
    load = benchlib.LoadRecord()
    load.warn()

    import jax

    from pixellm_jax.eval.batches import inference_shape
    from pixellm_jax.eval.evaluate import EvalSettings, run_eval
    from pixellm_jax.eval.generate import SamplingConfig
    from pixellm_jax.eval.loading import legacy_tokenizer
    from pixellm_jax.eval.runner import BatchRunner, data_mesh
    from pixellm_jax.eval.splits import parse_split
    from tests.eval.tiny import tiny_tokenizer
    from tests.muse_layout import write_muse_layout

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        hf, seg = tiny_tokenizer(tmp / "tokenizer")
        cfg = model_config(args.size, hf, seg, args)
        legacy = legacy_tokenizer(hf, cfg)
        model = chain_model(cfg, legacy, args.answer_words)
        write_muse_layout(tmp / "muse", "val", records=args.records, seed=0, size=args.image_px)
        split = parse_split(f"muse_val=muse:json={tmp / 'muse' / 'val.json'},images={tmp / 'muse' / 'pics'}")

        def decode(ids):
            return hf.decode([int(i) for i in ids], skip_special_tokens=False)

        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
        ours_runner = BatchRunner(model, data_mesh(jax.devices()[:1]))
        ours = EvalSettings(shape=inference_shape(cfg, 1, args.images, args.rows), sampling=sampling)
        official = EvalSettings(shape=inference_shape(cfg, 1, 1, 1), sampling=sampling)
        official_runner = RecomputeRunner(model)
        systems = {
            OURS: lambda: run_eval(ours_runner, legacy, decode, [split], tmp / "ours", ours, progress=False),
            OFFICIAL: lambda: run_eval(official_runner, legacy, decode, [split], tmp / "official", official,
                                       progress=False),
        }
        run = benchlib.interleave(systems, args.repeats)
        load.finish()
        records = {name: [json.loads(line) for line in (tmp / d / "muse_val.samples.jsonl").open()]
                   for name, d in ((OURS, "ours"), (OFFICIAL, "official"))}

    metrics = {name: run.results[name]["muse_val"] for name in systems}
    questions = metrics[OURS]["rows"]
    same_answers = sum(a["answer"] == b["answer"] for a, b in zip(records[OURS], records[OFFICIAL]))
    tokens = [r["generated_tokens"] for r in records[OURS]]
    rows = {}
    print(f"MUSE-layout split: {args.records} images, {questions} questions, answers of {min(tokens)}-{max(tokens)} "
          f"tokens (max {args.max_new_tokens}); model {args.size} (LLM {cfg.model.text.num_layers}x"
          f"{cfg.model.text.hidden_size}, CLIP {cfg.model.vision.num_layers}x{cfg.model.vision.hidden_size} at "
          f"{cfg.model.vision.image_size} px); {platform.processor() or platform.machine()}, "
          f"{pinned['threads']} threads")
    print(f"{'system':<46}{'first pass s':>13}{'median s':>10}{'min s':>8}{'max s':>8}{'questions/s':>13}")
    for name, times in run.times.items():
        st = benchlib.summary(times)
        rows[name] = {"first_pass_s": round(run.first_call[name], 3), "seconds": st,
                      "questions_per_s": round(questions / st["median"], 3)}
        print(f"{name:<46}{run.first_call[name]:>13.2f}{st['median']:>10.3f}{st['min']:>8.3f}{st['max']:>8.3f}"
              f"{questions / st['median']:>13.2f}")
    speedup = benchlib.ratio(run.times[OFFICIAL], run.times[OURS])
    print(f"speedup: {speedup['median_ratio']:.1f}x the official loop (paired passes {speedup['paired_min']:.1f}-"
          f"{speedup['paired_max']:.1f}x); {same_answers}/{questions} answers identical; metrics "
          f"{'identical' if metrics[OURS] == metrics[OFFICIAL] else 'DIFFER'}")
    print(f"load average {load.before:.2f} before, {load.after:.2f} after")
    load.warn()
    report = {"bench": "eval", "size": args.size, "records": args.records, "questions": questions,
              "rows_per_batch": args.rows, "images_per_batch": args.images, "max_new_tokens": args.max_new_tokens,
              "answer_tokens": {"min": min(tokens), "max": max(tokens)}, "cpu_count": os.cpu_count(),
              "pinned": pinned, **load.as_dict(), "systems": rows, "speedup": speedup["median_ratio"],
              "vs_official": speedup, "answers_identical": same_answers, "metrics_identical": metrics[OURS] == metrics[OFFICIAL],
              "metrics": metrics[OURS]}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
