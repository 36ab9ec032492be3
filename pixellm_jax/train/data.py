"""The run's tokenizer and input pipelines, from the config.

Tokenizer: `train.tokenizer` names a LLaMA tokenizer directory; empty takes the `train.init_from`
checkpoint's, or else (the demo) builds a small SentencePiece tokenizer from the synthetic dataset's
own texts into `<output_dir>/tokenizer` (process 0 builds it, the others read it from the shared
output directory). Either way the codebook tokens and `<im_start>`/`<im_end>` are added as the official code adds them, and the
model config gets the codebook ids the tokenizer assigned (`model.head.seg_token_ids`).

Sources: `data.datasets` names, each with its `data.sample_rates` entry, in the official `./dataset`
layout under `train.dataset_dir` (a name covering several datasets splits its rate evenly, as the
official loader picks them uniformly): `sem_seg` (ade20k, cocostuff, pascal_part, paco_lvis,
mapillary), `refer_seg` (refclef, refcoco, refcoco+, refcocog), `vqa` (LLaVA-Instruct-150k),
`muse` (muse_train.json), and `synthetic`, the built-in dataset (`train.synthetic_samples` records).
Held-out evaluation reads the synthetic dataset under another seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from pixellm_jax.config import Config, ConfigError
from pixellm_jax.data.conversation import LegacyTokenizer, training_prompt
from pixellm_jax.data.pipeline import InputPipeline, PipelineConfig
from pixellm_jax.data.sample import Source
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.data.tokenizer_builder import CHAT_TEXTS, build_tiny_tokenizer
from pixellm_jax.models.codebook import add_codebook_tokens

EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic scenes: a seed no training run shares
DEMO_VOCAB = 640


def synthetic_texts(count: int = 400, seed: int = 0) -> list[str]:
    """Training prompts of `count` synthetic conversations (what the demo tokenizer is trained on)."""
    source = SyntheticShapes(num_samples=count, seed=seed, min_size=32, max_size=32, questions_per_image=1)
    rng = np.random.default_rng(seed)
    texts = list(CHAT_TEXTS)
    for i in range(count):
        conversation = source.get(i, rng).conversations[0]
        texts.append(training_prompt(conversation.turns, use_im_start_end=False))
    return texts


def load_tokenizer(cfg: Config, output_dir: Path):
    """(HF tokenizer, LegacyTokenizer) of the run, building the demo tokenizer when none is named."""
    from transformers import AutoTokenizer

    if cfg.train.tokenizer:
        directory = Path(cfg.train.tokenizer)
    elif cfg.train.init_from:
        directory = Path(cfg.train.init_from) / "tokenizer"
    else:
        directory = output_dir / "tokenizer"
    if not cfg.train.tokenizer and not cfg.train.init_from:
        if jax.process_index() == 0 and not (directory / "tokenizer.model").is_file():
            build_tiny_tokenizer(directory, DEMO_VOCAB, synthetic_texts(seed=cfg.seed))
        if jax.process_count() > 1:  # the others read it from the shared output_dir
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pixellm demo tokenizer")
    if not directory.is_dir():
        raise ConfigError(f"train.tokenizer: {directory} is not a tokenizer directory")
    hf = AutoTokenizer.from_pretrained(str(directory))
    h = cfg.model.head
    add_codebook_tokens(hf, h.seg_token_num, h.scale_num)
    hf.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return hf, LegacyTokenizer.from_transformers(hf, h.seg_token_num, h.scale_num)


def with_tokenizer_ids(cfg: Config, hf_tokenizer, tok: LegacyTokenizer) -> Config:
    """`cfg` with the codebook ids the tokenizer assigned; the vocabulary must hold the tokenizer."""
    if len(hf_tokenizer) > cfg.model.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size: {cfg.model.text.vocab_size} rows cannot hold the "
                          f"tokenizer's {len(hf_tokenizer)} tokens")
    configured = cfg.model.head.seg_token_ids
    if configured and list(configured) != tok.seg_ids:
        raise ConfigError(f"model.head.seg_token_ids: {configured} differ from the tokenizer's codebook ids {tok.seg_ids}")
    head = dataclasses.replace(cfg.model.head, seg_token_ids=list(tok.seg_ids))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head=head))


def _named_sources(name: str, cfg: Config) -> list[Source]:
    root = Path(cfg.train.dataset_dir)
    d = cfg.data
    options = dict(num_classes_per_sample=d.num_classes_per_sample, num_classes_per_question=d.num_classes_per_question)
    if name == "synthetic":
        return [SyntheticShapes(num_samples=cfg.train.synthetic_samples, seed=cfg.seed,
                                max_targets=cfg.model.head.max_targets)]
    if name == "sem_seg":
        from pixellm_jax.data.semseg import semseg_sources

        return semseg_sources(root, **options)
    if name == "refer_seg":
        from pixellm_jax.data.refer import ReferSource

        return [ReferSource(root / "refer_seg", ds, **options) for ds in ("refclef", "refcoco", "refcoco+", "refcocog")]
    if name == "vqa":
        from pixellm_jax.data.vqa import VqaSource

        return [VqaSource(root / "llava_dataset" / "llava_instruct_150k.json", root / "coco" / "train2017")]
    if name == "muse":
        from pixellm_jax.data.muse import MuseSource

        return [MuseSource(root / "muse_train.json", root / "refer_seg" / "images" / "mscoco" / "images")]
    raise ConfigError(f"data.datasets: unknown dataset {name!r} (known: synthetic, sem_seg, refer_seg, vqa, muse)")


def training_sources(cfg: Config) -> tuple[list[Source], list[float]]:
    """The sources of `data.datasets` and their sample rates (a group's rate split evenly)."""
    sources, rates = [], []
    for name, rate in zip(cfg.data.datasets, cfg.data.sample_rates):
        if rate == 0:
            continue
        group = _named_sources(name, cfg)
        sources += group
        rates += [rate / len(group)] * len(group)
    if not sources:
        raise ConfigError("data.sample_rates: every dataset has rate 0")
    return sources, rates


def training_pipeline(cfg: Config, tok: LegacyTokenizer, groups: int = 1) -> InputPipeline:
    """This process's training batches, packed in `groups` blocks (`mesh.batch_groups`)."""
    sources, rates = training_sources(cfg)
    return InputPipeline(sources, tok, PipelineConfig.from_config(cfg, groups), rates)


def eval_pipeline(cfg: Config, tok: LegacyTokenizer, groups: int = 1) -> InputPipeline:
    """`train.eval_batches` held-out synthetic batches per process (one pass, no shuffling across passes)."""
    pc = PipelineConfig.from_config(cfg, groups)
    count = cfg.train.eval_batches * pc.images_per_batch
    source = SyntheticShapes(num_samples=count * jax.process_count(), seed=cfg.seed + EVAL_SEED_OFFSET,
                             max_targets=cfg.model.head.max_targets)
    pc = dataclasses.replace(pc, seed=cfg.seed + EVAL_SEED_OFFSET, num_epochs=1, num_workers=0,
                             epoch_size=len(source))
    return InputPipeline([source], tok, pc)

