"""The run's tokenizer and input pipelines, from the config.

Tokenizer: `train.tokenizer` names a LLaMA tokenizer directory; empty takes the `train.init_from`
checkpoint's, or else (a run from scratch, such as the demo) builds a small SentencePiece tokenizer
from the configured training sources' own texts into `<output_dir>/tokenizer` (process 0 builds it,
the others read it from the shared output directory; `pixellm build-tokenizer` builds one ahead).
A from-scratch vocabulary too large for such a tokenizer (`MAX_BUILT_PIECES`, e.g. a real-size
config) is an error: it needs a real tokenizer. Either way the codebook tokens and
`<im_start>`/`<im_end>` are added as the official code adds them, and the model config gets the
codebook ids the tokenizer assigned (`model.head.seg_token_ids`).

Sources: `data.datasets` entries are dataset specs (`pixellm_jax/data/specs.py`), each with its
`data.sample_rates` entry; a name alone reads the official `./dataset` layout under
`train.dataset_dir` (a group such as `sem_seg` or `refer_seg` splits its rate evenly, as the official
loader picks its datasets uniformly). Held-out data: `data.val` specs in evaluation mode, or, when
none is given and the run trains on `synthetic`, synthetic scenes under another seed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from pixellm_jax.config import Config, ConfigError
from pixellm_jax.data.conversation import LegacyTokenizer, training_prompt
from pixellm_jax.data.pipeline import InputPipeline, PipelineConfig, PipelineStats
from pixellm_jax.data.sample import BadSample, Source
from pixellm_jax.data.specs import DatasetSpec, SpecContext, SpecError, default_name, open_spec, parse_spec, protocol_of
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.data.tokenizer_builder import CHAT_TEXTS, build_tiny_tokenizer
from pixellm_jax.tokens import add_codebook_tokens

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic scenes: a seed no training run shares
MAX_BUILT_PIECES = 8192  # largest vocabulary a run builds from its own texts; beyond: a real tokenizer
TEXT_RECORDS = 400  # records whose conversations train a built tokenizer


def spec_context(cfg: Config, purpose: str = "train") -> SpecContext:
    d = cfg.data
    return SpecContext(dataset_dir=Path(cfg.train.dataset_dir), purpose=purpose, seed=cfg.seed,
                       max_targets=cfg.model.head.max_targets, synthetic_samples=cfg.train.synthetic_samples,
                       num_classes_per_sample=d.num_classes_per_sample,
                       num_classes_per_question=d.num_classes_per_question)


def _open(key: str, spec: str, ctx: SpecContext) -> list[Source]:
    try:
        return open_spec(spec, ctx)
    except SpecError as e:
        raise ConfigError(f"{key}: {e}") from None


def training_sources(cfg: Config) -> tuple[list[Source], list[float]]:
    """The sources of `data.datasets` and their sample rates (a group's rate split evenly)."""
    sources, rates = [], []
    ctx = spec_context(cfg)
    for i, (spec, rate) in enumerate(zip(cfg.data.datasets, cfg.data.sample_rates)):
        if rate == 0:
            continue
        group = _open(f"data.datasets[{i}]", spec, ctx)
        sources += group
        rates += [rate / len(group)] * len(group)
    if not sources:
        raise ConfigError("data.sample_rates: every dataset has rate 0")
    return sources, rates


def source_texts(sources: list[Source], count: int = TEXT_RECORDS, seed: int = 0) -> list[str]:
    """Training prompts of about `count` records spread evenly over `sources` (bad records skipped):
    the texts a tokenizer built for these data is trained on."""
    rng = np.random.default_rng(seed)
    texts = list(CHAT_TEXTS)
    per_source = max(1, count // len(sources))
    bad = PipelineStats()
    for source in sources:
        for index in np.linspace(0, len(source) - 1, min(per_source, len(source))).astype(int):
            try:
                sample = source.get(int(index), rng)
            except BadSample as e:
                bad.drop(e.category, f"{e.sample_id}: {e.reason}")
                continue
            texts += [training_prompt(c.turns, use_im_start_end=False) for c in sample.conversations]
    if len(texts) == len(CHAT_TEXTS):
        raise ConfigError(f"data.datasets: none of the {sum(bad.dropped.values())} records read to build the "
                          f"tokenizer could be used: {bad.dominant()}")
    return texts


def built_tokenizer_pieces(cfg: Config) -> int:
    """Pieces of a tokenizer built for `cfg`: the vocabulary less the codebook and <im_start>/<im_end>."""
    pieces = cfg.model.text.vocab_size - cfg.model.head.num_seg_tokens - 2
    if pieces > MAX_BUILT_PIECES:
        raise ConfigError(
            f"train.tokenizer: none is set and train.init_from is empty, so the run would build a tokenizer of "
            f"{pieces} pieces from its own texts, a toy for a {cfg.model.text.vocab_size}-row vocabulary; set "
            f"train.tokenizer to a LLaMA tokenizer directory or train.init_from to a converted checkpoint")
    if pieces < 300:
        raise ConfigError(f"model.text.vocab_size: {cfg.model.text.vocab_size} leaves {pieces} pieces for a built "
                          "tokenizer; it needs at least 300 (256 byte pieces + the special ones)")
    return pieces


def build_tokenizer(cfg: Config, directory: Path) -> Path:
    """Build the tokenizer a from-scratch run of `cfg` uses, from its training sources, into `directory`."""
    pieces = built_tokenizer_pieces(cfg)
    sources, _ = training_sources(cfg)
    return build_tiny_tokenizer(directory, pieces, source_texts(sources, seed=cfg.seed))


def build_tokenizer_command(args) -> int:
    """`pixellm build-tokenizer`: the tokenizer a from-scratch run of the config would build, from its
    data.datasets (or the `--dataset` specs), written to `--out` (beside, then renamed)."""
    import shutil

    from pixellm_jax.config import load_config, resolve_paths

    cfg = resolve_paths(load_config(args.config, args.overrides))
    if args.dataset:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, datasets=list(args.dataset),
                                                                sample_rates=[1.0] * len(args.dataset)))
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out: {out} already exists; pass --force to replace it")
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    build_tokenizer(cfg, stage)
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    pieces = built_tokenizer_pieces(cfg)
    print(f"wrote {out}: {pieces} pieces from {', '.join(cfg.data.datasets)} "
          f"(use it with train.tokenizer={out})")
    return 0


def tokenizer_directory(cfg: Config, output_dir: Path) -> Path:
    """Where the run's tokenizer is: train.tokenizer, the init_from checkpoint's, or the run's own."""
    if cfg.train.tokenizer:
        return Path(cfg.train.tokenizer)
    if cfg.train.init_from:
        return Path(cfg.train.init_from) / "tokenizer"
    return output_dir / "tokenizer"


def load_tokenizer(cfg: Config, output_dir: Path):
    """(HF tokenizer, LegacyTokenizer) of the run, building its own tokenizer when none is named."""
    from transformers import AutoTokenizer

    directory = tokenizer_directory(cfg, output_dir)
    if not cfg.train.tokenizer and not cfg.train.init_from:
        if jax.process_index() == 0 and not (directory / "tokenizer.model").is_file():
            build_tokenizer(cfg, directory)
        if jax.process_count() > 1:  # the others read it from the shared output_dir
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pixellm run tokenizer")
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


def training_pipeline(cfg: Config, tok: LegacyTokenizer, groups: int = 1) -> InputPipeline:
    """This process's training batches, packed in `groups` blocks (`mesh.batch_groups`)."""
    sources, rates = training_sources(cfg)
    return InputPipeline(sources, tok, PipelineConfig.from_config(cfg, groups), rates)


@dataclasses.dataclass
class ValSplit:
    """A held-out split of the run: its report name, source and protocol."""

    name: str
    source: Source
    protocol: str


def val_splits(cfg: Config) -> list[ValSplit]:
    """The `data.val` splits, opened in evaluation mode (a group kind gives one split per dataset)."""
    ctx = spec_context(cfg, "eval")
    splits = []
    for i, text in enumerate(cfg.data.val):
        spec: DatasetSpec = parse_spec(text)
        for source in _open(f"data.val[{i}]", text, ctx):
            name = default_name(spec, source, ctx)
            if len(splits) and name in [s.name for s in splits]:
                name = f"{name}_{i}"
            splits.append(ValSplit(name, source, protocol_of(spec, source)))
    return splits


def eval_pipeline(cfg: Config, tok: LegacyTokenizer, groups: int = 1, source: Source | None = None) -> InputPipeline:
    """One pass of training-shaped batches over a held-out `source` (default: `train.eval_batches`
    batches of held-out synthetic scenes per process), for the teacher-forced validation step."""
    pc = PipelineConfig.from_config(cfg, groups)
    if source is None:
        count = cfg.train.eval_batches * pc.images_per_batch
        source = SyntheticShapes(num_samples=count * jax.process_count(), seed=cfg.seed + EVAL_SEED_OFFSET,
                                 max_targets=cfg.model.head.max_targets)
    pc = dataclasses.replace(pc, seed=cfg.seed + EVAL_SEED_OFFSET, num_epochs=1, num_workers=0,
                             epoch_size=len(source), drop_remainder=False, max_drop_fraction=None)
    return InputPipeline([source], tok, pc)
