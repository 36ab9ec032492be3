"""Sharded training: batches on the mesh, train state, optimizer, jitted step, Orbax checkpoints, metrics, the loop.

`pixellm train --config …` runs `loop.train`. Modules import JAX lazily where they can so that the
command line starts fast; nothing here imports TensorFlow.
"""
