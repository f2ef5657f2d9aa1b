"""A held-out evaluation set of shapes drawn by another program: `navil eval --drawn`.

The training renderer (`Scene.render`) draws every shape as a polygon (`_outline`: circles as 48-gons, squares and
equilateral triangles from their corners) at twice the size and downscales it. A user's drawing is made differently,
so this set draws with Pillow's filled `ImageDraw` primitives directly at the final size, without supersampling
(hard, aliased edges), and changes every proportion the training data fixes:

| property    | training (`random_scene`)                   | drawn (`DrawnShapesDataset`)                          |
|-------------|---------------------------------------------|-------------------------------------------------------|
| circle      | 48-gon                                      | `draw.ellipse`                                        |
| square      | exact square                                | `draw.rectangle`, height/width 0.85–1.15              |
| triangle    | equilateral                                 | `draw.polygon`, isosceles, apex up, height/base 0.8–1.1 |
| star        | yes                                         | no                                                    |
| image sides | 192–320 px                                  | 200–480 px, aspect within 5:3                         |
| shape width | 0.55–0.9 of its strip, ≤ 0.6 of short side  | 0.25–0.45 of the short side (less if three must fit)  |
| placement   | one shape per equal vertical strip          | random gaps ≥ 8 px between shapes and to the edges    |
| background  | each channel 228–255                        | grey 235–255, or that grey with a warm tint           |
| fill jitter | each channel ±12                            | one brightness shift ±14 for all channels, then ±4    |
| words       | on half of the images                       | none                                                  |

What stays is the vocabulary: the colour names and RGB values of `COLORS`, the shape names, one to three shapes of
different kinds and colours with non-overlapping x-extents listed left to right, and the questions, asked by
`make_question` on a `Scene`, so their phrasings and answer formats are exactly the training set's.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .synthetic_data import COLORS, QUESTION_TYPES, Sample, Scene, Shape, make_question

DRAWN_SHAPES = ("circle", "square", "triangle")
# Every type but "ocr": the drawn images have no words.
DRAWN_QUESTION_TYPES = tuple(kind for kind in QUESTION_TYPES if kind != "ocr")
# Both sides of a drawn image lie in this range (pixels), with an aspect ratio between 3:5 and 5:3.
DRAWN_SIZE_RANGE = (200, 480)
MARGIN = 8  # least distance (pixels) from a shape to the image's edge
GAP = 8  # least horizontal distance (pixels) between two shapes
_STREAM = 10  # the third entry of the random seed (`ShapesDataset` uses 0–3)


@dataclass(frozen=True)
class DrawnShape(Shape):
    """A `Shape` with the inclusive pixel box (x0, y0, x1, y1) its primitive is drawn in."""

    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class DrawnScene(Scene):
    """A `Scene` of `DrawnShape`s, rendered with Pillow's primitives at final size."""

    def render(self) -> Image.Image:
        """The scene as an RGB PIL image of `width` x `height` pixels."""
        image = Image.new("RGB", (self.width, self.height), self.background)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            x0, y0, x1, y1 = shape.box
            if shape.kind == "circle":
                draw.ellipse(shape.box, fill=shape.fill)
            elif shape.kind == "square":
                draw.rectangle(shape.box, fill=shape.fill)
            elif shape.kind == "triangle":
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=shape.fill)
            else:
                raise ValueError(f"Drawn scenes have no {shape.kind!r}; use one of {DRAWN_SHAPES}.")
        return image


def _canvas(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height, each in `DRAWN_SIZE_RANGE`, with an aspect ratio between 3:5 and 5:3."""
    low, high = DRAWN_SIZE_RANGE
    width = int(rng.integers(low, high + 1))
    height = int(rng.integers(max(low, -(-width * 3 // 5)), min(high, width * 5 // 3) + 1))
    return width, height


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(235, 256))
    if rng.integers(2):
        return level, level, level
    return level, level - int(rng.integers(0, 6)), level - int(rng.integers(6, 13))


def _fill(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    shift = int(rng.integers(-14, 15))
    return tuple(int(np.clip(value + shift + rng.integers(-4, 5), 0, 255)) for value in COLORS[color])


def drawn_scene(rng: np.random.Generator, num_shapes: int) -> DrawnScene:
    """Draws a scene of `num_shapes` (1–3) shapes of different kinds and colours, separated horizontally."""
    if not 1 <= num_shapes <= len(DRAWN_SHAPES):
        raise ValueError(f"A drawn scene has 1 to {len(DRAWN_SHAPES)} shapes, got {num_shapes}.")
    width, height = _canvas(rng)
    background = _background(rng)
    shortest = min(width, height)
    kinds = [DRAWN_SHAPES[kind] for kind in rng.permutation(len(DRAWN_SHAPES))[:num_shapes]]
    colors = [list(COLORS)[color] for color in rng.permutation(len(COLORS))[:num_shapes]]

    # widths: 0.25–0.45 of the short side, capped so that all shapes, margins and gaps fit side by side
    widest = min(0.45 * shortest, (width - 2 * MARGIN - (num_shapes - 1) * GAP) / num_shapes)
    widths = [int(rng.uniform(0.25 * shortest, widest)) for _ in range(num_shapes)]
    # the spare width goes at random to the two margins and the gaps
    spare = width - 2 * MARGIN - (num_shapes - 1) * GAP - sum(widths)
    extra = np.floor(rng.dirichlet(np.ones(num_shapes + 1)) * spare).astype(int)
    x0 = MARGIN + int(extra[0])
    shapes = []
    for index, (kind, color, shape_width) in enumerate(zip(kinds, colors, widths)):
        if kind == "circle":
            shape_height = shape_width
        elif kind == "square":
            shape_height = round(shape_width * rng.uniform(0.85, 1.15))
        else:
            shape_height = round(shape_width * rng.uniform(0.8, 1.1))
        y0 = int(rng.integers(MARGIN, height - MARGIN - shape_height + 1))
        box = (x0, y0, x0 + shape_width - 1, y0 + shape_height - 1)
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        size = float(max(shape_width, shape_height))
        shapes.append(DrawnShape(kind, color, _fill(color, rng), center, size, box))
        x0 += shape_width + GAP + int(extra[index + 1])
    return DrawnScene(width, height, background, tuple(shapes))


class DrawnShapesDataset:
    """Deterministic, indexable (image, question, answer) examples on shapes drawn with Pillow's primitives.

    The interface of `ShapesDataset` that `evaluate` uses: `data[index]` is a `Sample` and `question_types` the types
    that items cycle through.

    Args:
        seed (`int`, *optional*, defaults to 1234): Item `index` is drawn from `numpy.random.default_rng([seed, index,
            10])`.
        question_types (`Sequence[str]`, *optional*, defaults to `DRAWN_QUESTION_TYPES`): Item `index` asks a question
            of type `question_types[index % len(question_types)]`.
        length (`int`, *optional*, defaults to 10000): `len()` of the dataset; items beyond it exist too.
    """

    def __init__(self, seed: int = 1234, question_types=DRAWN_QUESTION_TYPES, length: int = 10_000):
        question_types = tuple(question_types)
        unknown = sorted(set(question_types) - set(DRAWN_QUESTION_TYPES))
        if unknown or not question_types:
            raise ValueError(
                f"The drawn set asks some of {DRAWN_QUESTION_TYPES} (its images have no words), got "
                f"{list(question_types)}."
            )
        self.seed = seed
        self.question_types = question_types
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            raise IndexError(f"DrawnShapesDataset indices are non-negative, got {index}.")
        rng = np.random.default_rng([self.seed, index, _STREAM])
        question_type = self.question_types[index % len(self.question_types)]
        num_shapes = int(rng.integers(2 if question_type == "position" else 1, len(DRAWN_SHAPES) + 1))
        scene = drawn_scene(rng, num_shapes)
        question, answer = make_question(scene, question_type, rng)
        return Sample(scene.render(), question, answer, question_type, scene)
