"""LLaVA-Instruct source: conversations with the image moved to the front, zero masks."""

import json

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.data.sample import BadSample
from pixellm_jax.data.vqa import VqaSource


def write_llava(tmp_path, records):
    img_dir = tmp_path / "coco" / "train2017"
    img_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(img_dir / "000000000042.jpg")
    path = tmp_path / "llava_instruct_150k.json"
    path.write_text(json.dumps(records))
    return path, img_dir


RECORD = {
    "id": "000000000042",
    "image": "000000000042.jpg",
    "conversations": [
        {"from": "human", "value": "What is unusual here?\n<image>"},
        {"from": "gpt", "value": "A cat drives a car."},
        {"from": "human", "value": "Is it safe?"},
        {"from": "gpt", "value": "No."},
    ],
}


def test_vqa_sample(tmp_path):
    src = VqaSource(*write_llava(tmp_path, [RECORD]))
    assert len(src) == 1
    sample = src.get(0, np.random.default_rng(0))
    assert sample.sample_id == "vqa:000000000042" and sample.dataset == "vqa"
    assert sample.image.shape == (10, 14, 3)
    (conv,) = sample.conversations
    assert conv.turns == [("<image>\nWhat is unusual here?", "A cat drives a car."), ("Is it safe?", "No.")]
    assert conv.masks.shape == (0, 10, 14) and conv.masks.dtype == bool


def test_vqa_malformed_roles(tmp_path):
    bad = dict(RECORD, conversations=RECORD["conversations"][:1] + RECORD["conversations"][2:3])
    src = VqaSource(*write_llava(tmp_path, [bad]))
    with pytest.raises(BadSample, match="vqa:000000000042.*malformed conversation"):
        src.get(0, np.random.default_rng(0))
