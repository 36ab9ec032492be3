"""Weight conversion between PyTorch checkpoints and pixellm-jax.

Importers read released PixelLM checkpoints (with the OpenAI CLIP tower), llava-hf checkpoints and
original LLaVA checkpoints through declarative key tables (`tables`), one tensor at a time
(`readers`), check the whole mapping before anything is written (`validate`), fill the parameters
stream by stream (`stream`) and write an Orbax checkpoint directory (`checkpoint`) that
`load_pretrained` opens. Exporters go the other way (`exporters`); `check` compares logits with the
PyTorch source. Torch is needed to read `.bin` files and to export, not to load a converted model.
"""
