"""The one error type of the converter: bad input, named by file and key."""

from __future__ import annotations

from pixellm_jax.errors import UserError


class ConversionError(UserError, ValueError):
    """A checkpoint cannot be converted or exported; the message names the files and keys at fault."""
