"""Jitted batch evaluation and inference: KV-cache generation, referring / MUSE metrics, `pixellm eval` and
`pixellm predict`."""
