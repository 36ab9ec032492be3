"""A built-in synthetic segmentation dataset: coloured shapes on a plain background.

Each scene is drawn deterministically from (seed, index): an image of random height and width in
[min_size, max_size] on one of a few grey backgrounds, with 2–5 shapes (circle, square, triangle),
each with a colour, a size (small / large) and a position, drawn in order so later shapes occlude
earlier ones. Every shape keeps at least `min_visible` of its area visible, shapes of the same colour
never touch (so every boundary is visible), and a shape's mask is exactly its visible pixels. A shape
is *referable* when "{colour} {shape}" or else "{size} {colour} {shape}" names it alone in the scene.

Questions (drawn from the `rng` given to `get`, so each epoch may ask differently about a scene):
  * refer: one referable shape — "Can you segment the red circle in this image?" →
    "Sure, the circle in red [SEG].";
  * multi: 2–3 referable shapes in one question, answered per target in question order —
    "circle in red [SEG] and square in blue [SEG].";
  * relation: the shapes left of / right of / above / below a referable anchor, by centre, asked only
    when every other shape is at least `relation_margin` (fraction of the image side) from the anchor
    along that axis and 1..max_targets shapes qualify — "Segment the shapes left of the red circle." →
    "Sure, the square in blue [SEG] and the circle in green [SEG]." with targets ordered left to right
    (ties top to bottom), each named when every target is referable ("Sure, they are [SEG] and [SEG]."
    otherwise: answers that do not name their targets give prompts that differ only by position,
    docs/MULTI_TARGET.md).
Multi-target reasoning questions, whose targets the question does not name (finding them needs the
image); each target is named in the answer, left to right, by its unambiguous description:
  * class: every shape of one kind — "Segment every circle in this image." → "Sure, the circle in
    red [SEG] and the circle in blue [SEG].";
  * size: every small / large shape — "Which shapes here are large?" → "The large ones are the
    square in green [SEG] and the triangle in red [SEG]." ("The small one is ..." for one);
  * count: "How many triangles are in this image? Segment each of them." → "There are 2: the
    triangle in yellow [SEG] and the triangle in purple [SEG]."
Only unambiguous questions are asked (a reasoning question only when every target is referable and
1..max_targets shapes qualify). Each Sample carries `questions_per_image` single-turn
conversations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, SEG_PLACEHOLDER, Conversation, Sample, Source

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((245, 245, 245), (200, 200, 200), (110, 110, 110), (35, 35, 35))
SHAPES = ("circle", "square", "triangle")
# Radius range of each size, as a fraction of the image's shorter side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.07, 0.10), "large": (0.15, 0.19)}
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("refer", "multi", "relation", "class", "size", "count")
REASONING_KINDS = ("multi", "relation", "class", "size", "count")  # several targets per question

MASK_REQUEST = "Please output segmentation mask."
REFER_QUESTIONS = (
    "Can you segment the {} in this image?",
    "Please segment the {} in this image.",
    f"What is the {{}} in this image? {MASK_REQUEST}",
)
# Answers name their target with its colour last, right before its [SEG] ("the circle in red
# [SEG]"): the state that predicts the first codebook token sits on the colour word, so the prompt
# carries the feature the decoder can match in the image from the first step, and a small model
# trained from scratch learns to tell targets apart (with "Sure, it is [SEG]." the prompts of all
# targets start alike and collapse, and the masks ignore the question).
REFER_ANSWERS = ("Sure, the {name} {seg}.", "It is the {name} {seg}.", "Sure, {name} {seg}.")


def answer_name(name: str) -> str:
    """A description with its colour last: "large red circle" -> "large circle in red"."""
    *size, colour, kind = name.split()
    return " ".join([*size, kind, "in", colour])
MULTI_QUESTIONS = ("Can you segment the {} in this image?", "Please segment the {}.")
RELATION_QUESTIONS = (
    "Segment the shapes {} the {}.",
    f"Which shapes are {{}} the {{}}? {MASK_REQUEST}",
)

CLASS_QUESTIONS = (
    "Segment every {} in this image.",
    "Can you segment all the {}s here?",
)
SIZE_QUESTIONS = (
    f"Which shapes in this image are {{}}? {MASK_REQUEST}",
    "Segment all the {} shapes.",
)
COUNT_QUESTIONS = (
    "How many {}s are in this image? Segment each of them.",
    "Count the {}s and segment them.",
)
NUMBERS = ("zero", "one", "two", "three", "four", "five")

_SQUARE_HALF_SIDE = 0.85  # of the radius, so squares and circles have similar areas
_TRIANGLE_RADIUS = 1.2  # circumradius of the (upward) equilateral triangle, of the radius
_MAX_TRIES = 50


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    size: str  # small | large
    cx: float  # centre, in pixels (x right, y down; pixel (i, j) has centre (j + 0.5, i + 0.5))
    cy: float
    radius: float

    @property
    def extent(self) -> float:
        """Half-width of a box around the centre that contains the whole shape."""
        return self.radius * _TRIANGLE_RADIUS

    def region(self, height: int, width: int) -> np.ndarray:
        """[H, W] bool: pixels whose centre lies inside the full (unoccluded) shape."""
        y = np.arange(height)[:, None] + 0.5 - self.cy
        x = np.arange(width)[None, :] + 0.5 - self.cx
        if self.kind == "circle":
            return x * x + y * y <= self.radius**2
        if self.kind == "square":
            half = self.radius * _SQUARE_HALF_SIDE
            return (np.abs(x) <= half) & (np.abs(y) <= half)
        if self.kind == "triangle":
            r = self.radius * _TRIANGLE_RADIUS  # apex (0, −r), base corners (±r·√3/2, r/2)
            slope = np.sqrt(3.0)
            return (y <= r / 2) & (y >= slope * x - r) & (y >= -slope * x - r)
        raise ValueError(f"unknown shape kind {self.kind!r}")


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    shapes: list[Shape]  # in drawing order
    visible: np.ndarray  # [n, H, W] bool, visible pixels of each shape
    names: list[str | None]  # unambiguous description of each shape, None when not referable


def describe(shapes: list[Shape]) -> list[str | None]:
    """Shortest unambiguous description of each shape: "red circle", else "large red circle"."""
    names: list[str | None] = []
    for s in shapes:
        if sum((o.colour, o.kind) == (s.colour, s.kind) for o in shapes) == 1:
            names.append(f"{s.colour} {s.kind}")
        elif sum((o.colour, o.kind, o.size) == (s.colour, s.kind, s.size) for o in shapes) == 1:
            names.append(f"{s.size} {s.colour} {s.kind}")
        else:
            names.append(None)
    return names


def _touch(a: Shape, b: Shape) -> bool:
    """Whether the bounding discs of two shapes come within a pixel of each other."""
    return np.hypot(a.cx - b.cx, a.cy - b.cy) <= a.extent + b.extent + 1.0


def join_list(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class SyntheticShapes(Source):
    """Procedural shapes scenes with referring, multi-referring and relational questions."""

    name = "synthetic"

    def __init__(
        self,
        num_samples: int = 10000,
        seed: int = 0,
        min_size: int = 64,
        max_size: int = 96,
        min_shapes: int = 2,
        max_shapes: int = 5,
        questions_per_image: int = 2,
        kind_weights: tuple[float, ...] = (0.5, 0.25, 0.25, 0.0, 0.0, 0.0),
        max_targets: int = 3,
        min_visible: float = 0.6,
        relation_margin: float = 0.08,
    ):
        if not 2 <= min_shapes <= max_shapes:
            raise ValueError(f"need 2 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        if not 16 <= min_size <= max_size:
            raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
        if max_targets < 1 or questions_per_image < 1:
            raise ValueError("max_targets and questions_per_image must be positive")
        if not 1 <= len(kind_weights) <= len(KINDS) or min(kind_weights) < 0 or sum(kind_weights) <= 0:
            raise ValueError(f"kind_weights needs up to {len(KINDS)} non-negative weights ({', '.join(KINDS)}; "
                             f"missing ones are 0), got {kind_weights}")
        kind_weights = tuple(kind_weights) + (0.0,) * (len(KINDS) - len(kind_weights))
        self.num_samples = num_samples
        self.seed = seed
        self.min_size, self.max_size = min_size, max_size
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        self.questions_per_image = questions_per_image
        self.kind_p = np.asarray(kind_weights, float) / sum(kind_weights)
        self.max_targets = max_targets
        self.min_visible = min_visible
        self.relation_margin = relation_margin

    def __len__(self) -> int:
        return self.num_samples

    # -- scenes ---------------------------------------------------------------------------------

    def _draw_shape(self, rng: np.random.Generator, height: int, width: int) -> Shape:
        size = str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size]
        radius = float(rng.uniform(lo, hi)) * min(height, width)
        margin = radius * _TRIANGLE_RADIUS
        return Shape(
            kind=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            size=size,
            cx=float(rng.uniform(margin, width - margin)),
            cy=float(rng.uniform(margin, height - margin)),
            radius=radius,
        )

    def scene(self, index: int) -> Scene:
        """The scene of record `index` (a function of seed and index only)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, index])
        while True:
            height, width = (int(v) for v in rng.integers(self.min_size, self.max_size + 1, size=2))
            target = int(rng.integers(self.min_shapes, self.max_shapes + 1))
            shapes: list[Shape] = []
            regions: list[np.ndarray] = []
            for _ in range(_MAX_TRIES):
                if len(shapes) == target:
                    break
                cand = self._draw_shape(rng, height, width)
                region = cand.region(height, width)
                if not any(_touch(cand, s) for s in shapes if s.colour == cand.colour) and self._keeps_visible(
                    regions + [region]
                ):
                    shapes.append(cand)
                    regions.append(region)
            names = describe(shapes)
            if len(shapes) >= self.min_shapes and any(n is not None for n in names):
                break
        visible = np.stack(regions)
        covered = np.zeros((height, width), bool)
        for i in reversed(range(len(regions))):  # later shapes are drawn on top
            visible[i] &= ~covered
            covered |= regions[i]
        image = np.empty((height, width, 3), np.uint8)
        image[:] = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        for s, region in zip(shapes, regions):
            image[region] = COLOURS[s.colour]
        return Scene(image, shapes, visible, names)

    def _keeps_visible(self, regions: list[np.ndarray]) -> bool:
        covered = np.zeros_like(regions[0])
        for region in reversed(regions):  # last drawn is on top
            area = region.sum()
            if area == 0 or (region & ~covered).sum() < self.min_visible * area:
                return False
            covered |= region
        return True

    # -- questions ------------------------------------------------------------------------------

    def _refer(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[int]]:
        referable = [i for i, n in enumerate(scene.names) if n is not None]
        i = int(rng.choice(referable))
        question = str(rng.choice(REFER_QUESTIONS)).format(scene.names[i])
        answer = str(rng.choice(REFER_ANSWERS)).format(name=answer_name(scene.names[i]), seg=SEG_PLACEHOLDER)
        return question, answer, [i]

    def _multi(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[int]] | None:
        referable = [i for i, n in enumerate(scene.names) if n is not None]
        top = min(3, len(referable), self.max_targets)
        if top < 2:
            return None
        chosen = [int(i) for i in rng.choice(referable, size=int(rng.integers(2, top + 1)), replace=False)]
        names = [scene.names[i] for i in chosen]
        question = str(rng.choice(MULTI_QUESTIONS)).format(join_list(names))
        answer = join_list([f"{answer_name(n)} {SEG_PLACEHOLDER}" for n in names]) + "."
        return question, answer, chosen

    def relation_targets(self, scene: Scene, anchor: int, relation: str) -> list[int] | None:
        """Shapes in `relation` to `anchor`, left to right; None when some shape is too close to call."""
        a = scene.shapes[anchor]
        height, width = scene.image.shape[:2]
        horizontal = relation in ("left of", "right of")
        margin = self.relation_margin * (width if horizontal else height)
        targets = []
        for i, s in enumerate(scene.shapes):
            if i == anchor:
                continue
            d = (s.cx - a.cx) if horizontal else (s.cy - a.cy)
            if abs(d) < margin:
                return None
            if (d < 0) == (relation in ("left of", "above")):
                targets.append(i)
        return sorted(targets, key=lambda i: (scene.shapes[i].cx, scene.shapes[i].cy))

    def _relation(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[int]] | None:
        options = []
        for anchor, name in enumerate(scene.names):
            if name is None:
                continue
            for relation in RELATIONS:
                targets = self.relation_targets(scene, anchor, relation)
                if targets and len(targets) <= self.max_targets:
                    options.append((anchor, relation, targets))
        if not options:
            return None
        anchor, relation, targets = options[int(rng.integers(len(options)))]
        question = str(rng.choice(RELATION_QUESTIONS)).format(relation, scene.names[anchor])
        if self._named_targets(scene, targets):  # named, so each target's prompt carries what tells it apart
            return question, f"Sure, {self._named_answer(scene, targets)}.", targets
        if len(targets) == 1:
            answer = f"Sure, it is {SEG_PLACEHOLDER}."
        else:
            answer = f"Sure, they are {join_list([SEG_PLACEHOLDER] * len(targets))}."
        return question, answer, targets

    def _named_targets(self, scene: Scene, targets: list[int]) -> list[int] | None:
        """`targets` left to right when 1..max_targets of them and every one is referable, else None."""
        if not 1 <= len(targets) <= self.max_targets or any(scene.names[i] is None for i in targets):
            return None
        return sorted(targets, key=lambda i: (scene.shapes[i].cx, scene.shapes[i].cy))

    def _named_answer(self, scene: Scene, targets: list[int]) -> str:
        return join_list([f"the {answer_name(scene.names[i])} {SEG_PLACEHOLDER}" for i in targets])

    def _group(self, scene: Scene, attr: str, values, rng: np.random.Generator) -> tuple[str, list[int]] | None:
        """A random (value, targets) among the values of shape attribute `attr` whose shapes can be named."""
        options = [(v, t) for v in values if (t := self._named_targets(
            scene, [i for i, s in enumerate(scene.shapes) if getattr(s, attr) == v]))]
        return options[int(rng.integers(len(options)))] if options else None

    def _class(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[int]] | None:
        if not (group := self._group(scene, "kind", SHAPES, rng)):
            return None
        kind, targets = group
        question = str(rng.choice(CLASS_QUESTIONS)).format(kind)
        return question, f"Sure, {self._named_answer(scene, targets)}.", targets

    def _size(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[int]] | None:
        if not (group := self._group(scene, "size", SIZES, rng)):
            return None
        size, targets = group
        question = str(rng.choice(SIZE_QUESTIONS)).format(size)
        lead = f"The {size} one is" if len(targets) == 1 else f"The {size} ones are"
        return question, f"{lead} {self._named_answer(scene, targets)}.", targets

    def _count(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[int]] | None:
        if not (group := self._group(scene, "kind", SHAPES, rng)):
            return None
        kind, targets = group
        n = len(targets)
        question = str(rng.choice(COUNT_QUESTIONS)).format(kind)
        lead = "There is one" if n == 1 else f"There are {NUMBERS[n] if n < len(NUMBERS) else n}"
        return question, f"{lead}: {self._named_answer(scene, targets)}.", targets

    def question(self, scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str, list[int]]:
        """(question, answer with one [SEG] per target, target shape indices) of one `kind`; a referring
        question when the scene cannot support that kind."""
        ask = {"refer": self._refer, "multi": self._multi, "relation": self._relation,
               "class": self._class, "size": self._size, "count": self._count}[kind]
        return ask(scene, rng) or self._refer(scene, rng)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        scene = self.scene(index)
        conversations = []
        for _ in range(self.questions_per_image):
            kind = KINDS[int(rng.choice(len(KINDS), p=self.kind_p))]
            question, answer, targets = self.question(scene, kind, rng)
            conversations.append(
                Conversation(turns=[(IMAGE_PLACEHOLDER + "\n" + question, answer)], masks=scene.visible[targets])
            )
        return Sample(f"{self.name}:{index}", self.name, scene.image, conversations)
