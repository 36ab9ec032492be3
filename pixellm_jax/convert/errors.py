"""The one error type of the converter: bad input, named by file and key."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted or exported; the message names the files and keys at fault."""
