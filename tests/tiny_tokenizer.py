"""The tiny real LLaMA-format tokenizer the tests use (built offline; see data/tokenizer_builder.py).

Tests that need a tokenizer call `build_tiny_tokenizer(directory)` and load the result themselves.
"""

from pixellm_jax.data.tokenizer_builder import CHAT_TEXTS, TOKENIZER_CONFIG, build_tiny_tokenizer

_TEXTS = list(CHAT_TEXTS)  # the training sentences (test_conversation rebuilds the model from them)

__all__ = ["TOKENIZER_CONFIG", "_TEXTS", "build_tiny_tokenizer"]
