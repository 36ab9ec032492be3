"""Shared set-up of the training tests: one small run config and one persistent compilation cache.

Every test here trains the same model with the same batch shapes on the 8 simulated devices, in
this process or in `pixellm train` subprocesses, so each XLA program is compiled once and then read
from the cache (compilation dominates these tests on CPU).
"""

import os

import jax
import pytest
from jax._src import compilation_cache

# The demo config at toy size (overrides keep every compiled program identical across tests); the image
# size and LoRA rank stay at the toy values the tests were sized for, whatever the demo uses.
TOY = [
    "model.vision.hidden_size=32", "model.vision.intermediate_size=64", "model.vision.num_layers=2",
    "model.vision.image_size=64", "model.vision.pretrained_image_size=64",
    "model.lora.rank=16", "model.lora.alpha=32.0",
    "model.text.hidden_size=64", "model.text.intermediate_size=128", "model.text.num_layers=2",
    "model.head.out_dim=32", "model.head.decoder_depth=1", "model.head.decoder_mlp_dim=64",
    "optim.micro_batch_size=2", "data.conversations_per_batch=4", "optim.warmup_steps=2",
    "optim.total_steps=50", "train.synthetic_samples=400", "train.log_every=1", "train.progress=false",
    "train.compilation_cache=''",
]
# ... on the built-in synthetic set in memory, not the demo's files.
SMALL = [*TOY, "data.datasets=[synthetic]", "data.sample_rates=[1.0]", "data.val=[]"]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """A compilation cache directory shared by every test process of the session (xdist workers too)."""
    path = tmp_path_factory.getbasetemp().parent / "train_compile_cache"
    path.mkdir(parents=True, exist_ok=True)
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield path
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


@pytest.fixture(scope="session")
def subprocess_env(compile_cache):
    """Environment of `pixellm train` subprocesses: 8 CPU devices, the shared compilation cache."""
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return env
