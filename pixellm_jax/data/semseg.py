"""Semantic and part segmentation datasets turned into segmentation questions (reference §2.7, §5).

Each dataset is read in its released layout under one `base_dir` (the official `dataset/` folder):

    ade20k/images/training/*.jpg, ade20k/annotations/training/*.png     ADE20K (ADEChallengeData2016)
    cocostuff/train2017/*.png, coco/train2017/*.jpg                       COCO-Stuff 164k label maps
    mapillary/config_v2.0.json, mapillary/training/v2.0/labels/*.png,
        mapillary/training/images/*.jpg                                   Mapillary Vistas v2.0
    vlpart/paco/annotations/paco_lvis_v1_train.json, coco/<file_name>     PACO-LVIS
    vlpart/pascal_part/train.json,
        vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>        Pascal-Part

Label-map datasets: the classes present in the image (minus ignored ones) are the candidate targets,
one mask per class. ADE20K: label 0 is ignored, label v is class v−1. COCO-Stuff: pixel value =
class index, 255 and every class whose name contains "-" ("wall-brick", ...) are ignored.
Mapillary: pixel value = index into config_v2.0.json "labels" (lowercased "readable" names),
255 ignored. Part datasets: the image's annotations are the candidates, one mask per annotation,
an "object:part" category named "object part" or "the part of the object" with probability 1/2.
Up to num_classes_per_sample·num_classes_per_question targets are drawn per image and spread over
up to num_classes_per_sample questions, one conversation per question.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pixellm_jax.data import templates
from pixellm_jax.data.dataset_io import (
    DatasetFileError,
    build_sample,
    check_image_size,
    decode_segmentation,
    image_size_of,
    load_image,
    load_label_map,
    read_json,
    resolve_in_root,
    stack_masks,
)
from pixellm_jax.data.sample import BadSample, Sample, Source

IGNORE = -1  # class index of ignored pixels after `class_map`


class _TargetOptions:
    """Sampling options shared by the semantic segmentation sources."""

    def __init__(self, num_classes_per_sample: int, num_classes_per_question: int, questions: Sequence[str]):
        self.num_classes_per_sample = num_classes_per_sample
        self.num_classes_per_question = num_classes_per_question
        self.questions = tuple(questions)

    def groups(self, items: Sequence, rng: np.random.Generator) -> list[list]:
        return templates.sample_targets(items, rng, self.num_classes_per_sample, self.num_classes_per_question)


class LabelMapSource(Source):
    """Images with a class-index PNG per image. Subclasses list the files and map pixel values."""

    class_names: tuple[str, ...] = ()

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        listed_dir: Path,
        num_classes_per_sample: int = 3,
        num_classes_per_question: int = 3,
        questions: Sequence[str] = templates.SHORT_QUESTION_LIST,
    ):
        if not pairs:
            raise DatasetFileError(listed_dir, "no images found: empty dataset")
        self._pairs = list(pairs)
        self._options = _TargetOptions(num_classes_per_sample, num_classes_per_question, questions)

    def class_map(self, label: np.ndarray) -> np.ndarray:
        """Pixel values → class indices into `class_names`, IGNORE for ignored pixels."""
        return np.where(label == 255, IGNORE, label)

    def __len__(self) -> int:
        return len(self._pairs)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        image_path, label_path = self._pairs[index]
        sample_id = f"{self.name}:{image_path.name}"
        image = load_image(image_path, sample_id)
        classes = self.class_map(load_label_map(label_path, sample_id))
        check_image_size(image, classes.shape[0], classes.shape[1], sample_id, image_path)
        present = np.unique(classes[classes != IGNORE])
        if present.size and (present.min() < 0 or present.max() >= len(self.class_names)):
            raise BadSample(sample_id, f"label values outside the {len(self.class_names)}-class table in {label_path}")
        if present.size == 0:
            raise BadSample(sample_id, f"no labelled class in {label_path}")
        conversations = []
        for group in self._options.groups([int(c) for c in present], rng):
            turn = templates.segmentation_turn([self.class_names[c] for c in group], rng, self._options.questions)
            conversations.append(([turn], np.stack([classes == c for c in group])))
        return build_sample(sample_id, self.name, image, conversations)


def _pairs(label_dir: Path, image_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs for every label PNG, the image being `<stem>.jpg` in image_dir."""
    return [(image_dir / f"{p.stem}.jpg", p) for p in sorted(label_dir.glob("*.png"))]


class Ade20kSource(LabelMapSource):
    name = "ade20k"

    def __init__(self, base_dir: str | Path, split: str = "training", **options):
        self.class_names = ADE20K_CLASSES
        root = Path(base_dir) / "ade20k"
        image_dir = root / "images" / split
        pairs = [(p, root / "annotations" / split / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
        super().__init__(pairs, image_dir, **options)

    def class_map(self, label: np.ndarray) -> np.ndarray:
        return np.where(label == 0, IGNORE, label - 1)


class CocoStuffSource(LabelMapSource):
    name = "cocostuff"

    def __init__(self, base_dir: str | Path, split: str = "train2017", **options):
        self.class_names = COCO_STUFF_CLASSES
        label_dir = Path(base_dir) / "cocostuff" / split
        super().__init__(_pairs(label_dir, Path(base_dir) / "coco" / split), label_dir, **options)
        self._ignored = np.array([i for i, c in enumerate(self.class_names) if "-" in c])

    def class_map(self, label: np.ndarray) -> np.ndarray:
        return np.where((label == 255) | np.isin(label, self._ignored), IGNORE, label)


class MapillarySource(LabelMapSource):
    name = "mapillary"

    def __init__(self, base_dir: str | Path, split: str = "training", **options):
        root = Path(base_dir) / "mapillary"
        config_path = root / "config_v2.0.json"
        config = read_json(config_path)
        try:
            self.class_names = tuple(str(x["readable"]).lower() for x in config["labels"])
        except (TypeError, KeyError) as e:
            raise DatasetFileError(config_path, f"expected labels [{{readable: ...}}]: {e}") from None
        label_dir = root / split / "v2.0" / "labels"
        super().__init__(_pairs(label_dir, root / split / "images"), label_dir, **options)


class CocoPartSource(Source):
    """Part segmentation in COCO-JSON form (PACO-LVIS, Pascal-Part): one target per annotation."""

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        num_classes_per_sample: int = 3,
        num_classes_per_question: int = 3,
        questions: Sequence[str] = templates.SHORT_QUESTION_LIST,
    ):
        self._options = _TargetOptions(num_classes_per_sample, num_classes_per_question, questions)
        self.image_dir = Path(image_dir)
        data = read_json(annotation_file)
        try:
            self._classes = {cat["id"]: self.parse_category(str(cat["name"])) for cat in data["categories"]}
            self._images = {img["id"]: img for img in data["images"]}
            self._anns: dict[int, list[dict]] = {}
            for ann in data["annotations"]:
                self._anns.setdefault(ann["image_id"], []).append(ann)
        except (TypeError, KeyError, ValueError) as e:
            raise DatasetFileError(annotation_file, f"malformed COCO annotation file: {e!r}") from None
        # Images without annotations are left out (the official loader redraws when it meets one).
        self._image_ids = sorted(i for i in self._images if self._anns.get(i))
        if not self._image_ids:
            raise DatasetFileError(annotation_file, "no annotated images: empty dataset")

    @staticmethod
    def parse_category(name: str) -> str | tuple[str, str]:
        """"object:part" → (object, part); a plain object name stays a string. "_(" suffixes dropped."""
        parts = [p.split("_(")[0] for p in name.strip().split(":")]
        if len(parts) == 1:
            return parts[0]
        if len(parts) != 2:
            raise ValueError(f"category name {name!r} is neither 'object' nor 'object:part'")
        return parts[0], parts[1]

    def __len__(self) -> int:
        return len(self._image_ids)

    def _target_name(self, category: str | tuple[str, str], rng: np.random.Generator) -> str:
        if isinstance(category, str):
            return category
        obj, part = category
        return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        info = self._images[self._image_ids[index]]
        sample_id = f"{self.name}:{info.get('file_name')}"
        path = resolve_in_root(self.image_dir, info.get("file_name"), sample_id)
        image = load_image(path, sample_id)
        height, width = image_size_of(info, sample_id)
        check_image_size(image, height, width, sample_id, path)
        conversations = []
        for group in self._options.groups(self._anns[info["id"]], rng):
            names, masks = [], []
            for ann in group:
                category = self._classes.get(ann.get("category_id"))
                if category is None:
                    raise BadSample(sample_id, f"annotation {ann.get('id')} has unknown category {ann.get('category_id')!r}")
                names.append(self._target_name(category, rng))
                masks.append(decode_segmentation(ann.get("segmentation"), height, width, sample_id))
            turn = templates.segmentation_turn(names, rng, self._options.questions)
            conversations.append(([turn], stack_masks(masks, height, width)))
        return build_sample(sample_id, self.name, image, conversations)


class PacoLvisSource(CocoPartSource):
    name = "paco_lvis"

    def __init__(self, base_dir: str | Path, **options):
        base = Path(base_dir)
        super().__init__(base / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json", base / "coco", **options)


class PascalPartSource(CocoPartSource):
    name = "pascal_part"

    def __init__(self, base_dir: str | Path, **options):
        root = Path(base_dir) / "vlpart" / "pascal_part"
        super().__init__(root / "train.json", root / "VOCdevkit" / "VOC2010" / "JPEGImages", **options)

    @staticmethod
    def parse_category(name: str) -> tuple[str, str]:
        """Pascal-Part categories are always "object:part", taken as written."""
        parts = name.strip().split(":")
        if len(parts) != 2:
            raise ValueError(f"category name {name!r} is not 'object:part'")
        return parts[0], parts[1]


SEMSEG_SOURCES: dict[str, type[Source]] = {
    "ade20k": Ade20kSource,
    "cocostuff": CocoStuffSource,
    "pascal_part": PascalPartSource,
    "paco_lvis": PacoLvisSource,
    "mapillary": MapillarySource,
}


def semseg_sources(base_dir: str | Path, names: Sequence[str] = tuple(SEMSEG_SOURCES), **options) -> list[Source]:
    """The named semantic segmentation sources (officially mixed uniformly) under one base_dir."""
    unknown = [n for n in names if n not in SEMSEG_SOURCES]
    if unknown:
        raise ValueError(f"unknown semantic segmentation datasets {unknown}; known: {sorted(SEMSEG_SOURCES)}")
    return [SEMSEG_SOURCES[n](base_dir, **options) for n in names]


# Class tables. ADE20K: the 150 SceneParsing classes, index = label − 1 (official utils/ade20k_classes.json).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

# COCO-Stuff: the 182 classes of the stuffthingmaps label PNGs, index = pixel value
# (official utils/cocostuff_classes.txt without its "0: unlabeled" line).
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe",
    "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "mirror", "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush", "banner",
    "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain",
    "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other",
    "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
    "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops",
    "window-blind", "window-other", "wood",
)  # fmt: skip
