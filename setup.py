"""pixellm-jax: PixelLM (multi-target reasoning segmentation LMM) in JAX/Flax NNX."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.7",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "numpy>=1.26",
    "scipy>=1.11",
    "pyyaml>=6",
    "transformers>=4.46",  # tokenizers and checkpoint reading; no torch needed for that
    "huggingface_hub>=0.26",  # `pixellm convert owner/name`: hub snapshots into the HF cache
    "tokenizers>=0.20",
    "sentencepiece>=0.2",
    "safetensors>=0.4",
    "ml_dtypes>=0.4",
    "pillow>=10",
    "tqdm>=4.66",
    "tensorboardX>=2.6",  # training metrics as TensorBoard event files, without TensorFlow
    "pycocotools>=2.0.7",  # polygon / RLE masks of the raw data sources
]
TORCH = ["torch>=2.4"]  # conversion, export and parity references
DATA = ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "importlib_resources", "pycocotools>=2.0.7"]
SERVE = ["gradio>=6"]  # `pixellm serve`: the web demo
DEV = TORCH + SERVE + [
    "selenium>=4.11",  # tests/test_serve.py drives the demo in headless Chromium (the system's chromedriver)
    "pytest>=8",
    "pytest-xdist>=3.5",
    "pytest-timeout>=2.3",  # a hung test fails with its stack instead of stalling CI
    "peft>=0.13",
    "segment-anything>=1.0",
    "pycocotools>=2.0.7",
    "tensorflow-datasets>=4.9",  # tests/data/test_tfds.py: prepared datasets (TensorFlow not needed)
    "importlib_resources",  # imported by tensorflow-datasets 4.9.x builders but not declared
    "tensorflow-cpu>=2.16",  # only for building the TFDS catalog `ref_coco` fixture (its builder needs TF)
]

setup(
    name="pixellm-jax",
    version="0.1.0",
    description="PixelLM in JAX/Flax NNX: sharded training, PyTorch weight conversion, jitted evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["pixellm_jax", "pixellm_jax.*"]),
    install_requires=CORE,
    extras_require={"torch": TORCH, "data": DATA, "serve": SERVE, "dev": DEV},
    entry_points={"console_scripts": ["pixellm=pixellm_jax.cli:main"]},
)
