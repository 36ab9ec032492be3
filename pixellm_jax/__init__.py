"""pixellm-jax: PixelLM in JAX/Flax NNX."""

__version__ = "0.1.0"
