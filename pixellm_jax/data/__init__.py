"""Datasets, conversation templates, transforms and the Grain input pipeline."""
