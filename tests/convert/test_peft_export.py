"""LoRA export: the peft adapter loads in `peft` and computes what our LoRA computes; so does a merged export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pixellm_jax.convert.checkpoint import Pretrained
from pixellm_jax.convert.converter import convert_model
from pixellm_jax.convert.exporters import export_peft, export_pixellm
from pixellm_jax.convert.importers import prepare_import
from pixellm_jax.convert.readers import CheckpointReader
from pixellm_jax.models.lora import LoRAParam
from tests.convert import fixtures as fx

TOL = 1e-5


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    source, _, _ = fx.write_pixellm_release(root)
    spec = prepare_import("pixellm", source, clip=fx.write_clip(root / "clip"), base="tiny")
    model, _ = convert_model(spec)
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):  # a trained-looking adapter
        var.set_value(0.1 * jax.random.normal(jax.random.key(len(path) + 7 * (path[-1] == "lora_b")),
                                              var.get_value().shape))
    return Pretrained(model, spec.config, source, {})


def _torch_llama(directory, vocab):
    """transformers LLaMA holding the language-model tensors of an exported PixelLM release."""
    reader = CheckpointReader(directory)
    state = {k: torch.from_numpy(np.array(reader.read(k), np.float32)) for k in reader.keys()
             if k.startswith(("model.embed_tokens", "model.norm", "lm_head"))
             or (k.startswith("model.layers.") and not k.endswith("inv_freq"))}
    llama = fx.tiny_llama(vocab)
    llama.load_state_dict(state, strict=True)
    return llama.eval()


def test_adapter_loads_in_peft_and_matches(pretrained, tmp_path):
    from peft import PeftModel

    ids = np.random.default_rng(0).integers(3, fx.RELEASE_VOCAB, size=(2, 14))
    ours = np.asarray(nnx.jit(lambda llm, x: llm(x).logits)(pretrained.model.llm, jnp.asarray(ids, jnp.int32)))
    vocab = pretrained.config.model.text.vocab_size

    export_peft(pretrained, tmp_path / "adapter", base_model="llava-base")
    export_pixellm(pretrained, tmp_path / "base", merge=False, dtype="float32")
    base = _torch_llama(tmp_path / "base", vocab)
    with torch.no_grad():
        without = base(torch.tensor(ids)).logits.numpy()
    assert np.abs(without - ours).max() > 1e-2  # the adapter matters
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(_, "lora_A")]
    assert len(adapted) == 2 * fx.TEXT["num_hidden_layers"]  # exactly the LLaMA q/v projections
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - ours).max() <= TOL

    export_pixellm(pretrained, tmp_path / "merged", merge=True, dtype="float32")  # merges the model in place
    merged = _torch_llama(tmp_path / "merged", vocab)
    with torch.no_grad():
        assert np.abs(merged(torch.tensor(ids)).logits.numpy() - ours).max() <= TOL
