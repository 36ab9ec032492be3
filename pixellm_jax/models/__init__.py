"""Network parts of PixelLM, one file each."""
