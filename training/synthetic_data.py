"""Synthetic shapes-and-words data: the images, questions, captions and text the embedded tiny NaViL is trained on.

Every image shows 1–3 simple shapes (circle, square, triangle, star), each of its own kind and in its own colour (red,
green, blue, yellow, purple, orange), at random positions and sizes on a plain light background, and sometimes one
short word from `WORDS` written in dark letters in a band at the top or bottom. Images have varied sizes and aspect
ratios: both sides are drawn from a size range (`TRAIN_SIZE_RANGE` for training; `OUT_OF_RANGE_SIZES` lie outside
it, to test generalisation to unseen resolutions).

Shapes occupy separate vertical strips, so "left to right" is always well defined; it is the order of every listing
("Describe the image." → "a red circle, a blue square and a green star"). The word is not a shape: it is neither
counted nor described.

Question types (`QUESTION_TYPES`), one phrasing each:

| type     | question                                              | answer                             |
|----------|-------------------------------------------------------|------------------------------------|
| color    | What color is the circle?                             | red                                |
| shape    | What shape is the blue one?                           | square                             |
| count    | How many shapes are there?                            | two                                |
| describe | Describe the image.                                   | a red circle and a blue square     |
| position | Is the red circle left or right of the blue square?   | left                               |
| ocr      | What word is written?                                 | cat                                |

Everything is deterministic: item `index` of a dataset with seed `seed` is drawn from `numpy.random.default_rng([seed,
index, kind])`, so items can be generated in any order with identical results.
"""

import itertools
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 175),
    "orange": (245, 125, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
WORDS = ("cat", "dog", "sun", "box", "hat", "cup", "map", "pen", "key", "bus")
NUMBER_WORDS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "describe", "position", "ocr")
# Left/right questions per training image by default (a scene of three shapes has six ordered pairs).
MAX_POSITION_QUESTIONS = 2

# Both sides of a training image lie in this range (pixels), so aspect ratios range from 3:5 to 5:3.
TRAIN_SIZE_RANGE = (192, 320)
# Held-out sizes outside the training range: both sides in one of these ranges (smaller or larger images).
OUT_OF_RANGE_SIZES = ((112, 176), (352, 448))

_SUPERSAMPLE = 2  # scenes are drawn at twice the size and downscaled, for smooth edges
# Streams of random numbers per item (the third entry of the seed).
_QUESTION, _CAPTION, _TEXT, _QUESTIONS = 0, 1, 2, 3


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour name, fill (RGB), centre (x, y) and size (side of its bounding square), in pixels."""

    kind: str
    color: str
    fill: tuple[int, int, int]
    center: tuple[float, float]
    size: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def with_article(self) -> str:
        """The name with its article: "a red circle", "an orange star"."""
        return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.name}"


@dataclass(frozen=True)
class Scene:
    """What an image shows: canvas size, background, shapes (listed left to right) and an optional word."""

    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    word: Optional[str] = None
    word_origin: tuple[float, float] = (0.0, 0.0)
    font_size: int = 16
    ink: tuple[int, int, int] = (30, 30, 30)

    def render(self) -> Image.Image:
        """The scene as an RGB PIL image of `width` x `height` pixels."""
        scale = _SUPERSAMPLE
        image = Image.new("RGB", (self.width * scale, self.height * scale), self.background)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            draw.polygon(_outline(shape, scale), fill=shape.fill)
        if self.word is not None:
            font = _font(self.font_size * scale)
            draw.text((self.word_origin[0] * scale, self.word_origin[1] * scale), self.word, fill=self.ink, font=font)
        return image.resize((self.width, self.height), Image.Resampling.BOX)

    @property
    def word_box(self) -> Optional[tuple[float, float, float, float]]:
        """(x0, y0, x1, y1) of the written word's ink in canvas pixels, or None without a word."""
        if self.word is None:
            return None
        left, top, right, bottom = _font(self.font_size).getbbox(self.word)
        x, y = self.word_origin
        return x + left, y + top, x + right, y + bottom

    def describe(self) -> str:
        """The shapes left to right: "a red circle", "a red circle and an orange square", "a …, a … and a …"."""
        return _listing([shape.with_article for shape in self.shapes])

    def caption(self) -> str:
        """Caption for captioning pre-training: "two shapes: a red circle and a blue square, and the word cat"."""
        count = len(self.shapes)
        caption = f"{NUMBER_WORDS[count]} shape{'s' if count > 1 else ''}: {self.describe()}"
        if self.word is not None:
            caption += f", and the word {self.word}"
        return caption

    def text(self) -> str:
        """The scene in words, for text-only pre-training: "the image shows a red circle. the word cat is written."."""
        text = f"the image shows {self.describe()}."
        if self.word is not None:
            text += f" the word {self.word} is written."
        return text


@dataclass(frozen=True)
class Sample:
    """One example: an image, a question about it, the expected answer, the question type and the scene."""

    image: Image.Image
    question: str
    answer: str
    question_type: str
    scene: Scene


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (no font file needed) at `size` pixels."""
    return ImageFont.load_default(size=size)


def _listing(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _outline(shape: Shape, scale: float) -> list[tuple[float, float]]:
    """Polygon of a shape in canvas coordinates times `scale` (circles as 48-gons)."""
    cx, cy = shape.center[0] * scale, shape.center[1] * scale
    radius = shape.size * scale / 2
    if shape.kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radii = np.full_like(angles, radius)
    elif shape.kind == "square":
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        radii = np.full_like(angles, radius * np.sqrt(2) * 0.85)
    elif shape.kind == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full_like(angles, radius)
        cy += radius * 0.2  # centres the triangle's bounding box
    elif shape.kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    else:
        raise ValueError(f"Unknown shape kind {shape.kind!r}; use one of {SHAPES}.")
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]


def size_ranges(size_range) -> tuple[tuple[int, int], ...]:
    """One (low, high) range of image sides, or a sequence of such ranges, as a tuple of ranges."""
    if len(size_range) == 2 and all(isinstance(value, (int, np.integer)) for value in size_range):
        return (tuple(size_range),)
    return tuple(tuple(item) for item in size_range)


def random_scene(
    rng: np.random.Generator,
    size_range=TRAIN_SIZE_RANGE,
    num_shapes: Optional[int] = None,
    with_word: Optional[bool] = None,
) -> Scene:
    """Draws a scene.

    Args:
        rng (`np.random.Generator`): The source of randomness.
        size_range: (low, high) image sides in pixels, or several such ranges (one is picked, then both sides).
        num_shapes (`int`, *optional*): Number of shapes (1–3); random when omitted.
        with_word (`bool`, *optional*): Whether a word is written; with probability ½ when omitted.
    """
    ranges = size_ranges(size_range)
    low, high = ranges[rng.integers(len(ranges))]
    width, height = int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))
    shortest = min(width, height)
    background = tuple(int(value) for value in rng.integers(228, 256, size=3))
    if num_shapes is None:
        num_shapes = int(rng.integers(1, 4))
    if with_word is None:
        with_word = bool(rng.integers(2))

    # the word takes a band at the top or the bottom; the shapes share the rest in equal vertical strips
    top, bottom = 0.0, float(height)
    word, word_origin = None, (0.0, 0.0)
    font_size = max(8, round(shortest * rng.uniform(0.17, 0.22)))
    ink = tuple(int(value) for value in rng.integers(10, 70, size=3))
    if with_word:
        word = WORDS[rng.integers(len(WORDS))]
        _, _, right, lower = _font(font_size).getbbox(word)
        band = lower + 0.25 * font_size
        x = float(rng.uniform(0, max(width - right, 1)))
        if rng.integers(2):
            word_origin, top = (x, 0.1 * font_size), band
        else:
            word_origin, bottom = (x, height - band + 0.05 * font_size), height - band
    kinds = rng.permutation(len(SHAPES))[:num_shapes]
    colors = rng.permutation(len(COLORS))[:num_shapes]
    strip = width / num_shapes
    shapes = []
    for index, (kind, color) in enumerate(zip(kinds, colors)):
        size = rng.uniform(0.55, 0.9) * min(strip, bottom - top, 0.6 * shortest)
        x = rng.uniform(index * strip + size / 2, (index + 1) * strip - size / 2)
        y = rng.uniform(top + size / 2, bottom - size / 2)
        name = list(COLORS)[color]
        fill = tuple(int(np.clip(value + rng.integers(-12, 13), 0, 255)) for value in COLORS[name])
        shapes.append(Shape(SHAPES[kind], name, fill, (float(x), float(y)), float(size)))
    return Scene(width, height, background, tuple(shapes), word, word_origin, int(font_size), ink)


def color_question(shape: Shape) -> tuple[str, str]:
    return f"What color is the {shape.kind}?", shape.color


def shape_question(shape: Shape) -> tuple[str, str]:
    return f"What shape is the {shape.color} one?", shape.kind


def position_question(shapes: Sequence[Shape], first: int, second: int) -> tuple[str, str]:
    """Is `shapes[first]` left or right of `shapes[second]` (shapes listed left to right)?"""
    answer = "left" if first < second else "right"
    return f"Is the {shapes[first].name} left or right of the {shapes[second].name}?", answer


def make_question(scene: Scene, question_type: str, rng: np.random.Generator) -> tuple[str, str]:
    """A (question, answer) pair of `question_type` about `scene` (phrasings in the module docstring)."""
    shapes = scene.shapes
    if question_type == "color":
        return color_question(shapes[rng.integers(len(shapes))])
    if question_type == "shape":
        return shape_question(shapes[rng.integers(len(shapes))])
    if question_type == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(shapes)]
    if question_type == "describe":
        return "Describe the image.", scene.describe()
    if question_type == "position":
        if len(shapes) < 2:
            raise ValueError("A position question needs a scene with at least two shapes.")
        first, second = rng.choice(len(shapes), size=2, replace=False)
        return position_question(shapes, first, second)
    if question_type == "ocr":
        if scene.word is None:
            raise ValueError("An ocr question needs a scene with a word.")
        return "What word is written?", scene.word
    raise ValueError(f"Unknown question type {question_type!r}; use one of {QUESTION_TYPES}.")


def scene_for_question(rng: np.random.Generator, question_type: str, size_range=TRAIN_SIZE_RANGE) -> Scene:
    """A random scene that a `question_type` question can be asked about (two shapes or more for position, a word
    for ocr)."""
    num_shapes = int(rng.integers(2 if question_type == "position" else 1, 4))
    return random_scene(rng, size_range, num_shapes=num_shapes, with_word=True if question_type == "ocr" else None)


def _answerable(scene: Scene, question_type: str) -> bool:
    if question_type == "position":
        return len(scene.shapes) >= 2
    return question_type != "ocr" or scene.word is not None


class ShapesDataset:
    """Deterministic, indexable (image, question, answer) examples.

    Args:
        seed (`int`, *optional*, defaults to 0): Item `index` is drawn from `numpy.random.default_rng([seed, index,
            stream])`; different seeds give independent data (training uses seed 0, evaluation other seeds).
        size_range (*optional*, defaults to `TRAIN_SIZE_RANGE`): (low, high) image sides in pixels, or several ranges
            such as `OUT_OF_RANGE_SIZES`.
        question_types (`Sequence[str]`, *optional*, defaults to `QUESTION_TYPES`): Item `index` asks a question of
            type `question_types[index % len(question_types)]`, so consecutive items cycle through the types.
        length (`int`, *optional*, defaults to 10000): `len()` of the dataset; items beyond it exist too.
        position_questions (`int`, *optional*, defaults to `MAX_POSITION_QUESTIONS`): Left/right questions per image
            of `questions` (random ordered pairs of its shapes; 6 asks about every pair of three shapes).
    """

    def __init__(
        self,
        seed: int = 0,
        size_range=TRAIN_SIZE_RANGE,
        question_types=QUESTION_TYPES,
        length=10_000,
        position_questions: int = MAX_POSITION_QUESTIONS,
    ):
        unknown = sorted(set(question_types) - set(QUESTION_TYPES))
        if unknown or not question_types:
            raise ValueError(f"question_types must be some of {QUESTION_TYPES}, got {list(question_types)}.")
        self.seed = seed
        self.size_range = size_range
        self.question_types = tuple(question_types)
        self.length = length
        self.position_questions = position_questions

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"ShapesDataset indices are non-negative, got {index}.")
        return np.random.default_rng([self.seed, index, stream])

    def __getitem__(self, index: int) -> Sample:
        rng = self._rng(index, _QUESTION)
        question_type = self.question_types[index % len(self.question_types)]
        scene = scene_for_question(rng, question_type, self.size_range)
        question, answer = make_question(scene, question_type, rng)
        return Sample(scene.render(), question, answer, question_type, scene)

    def caption_scene(self, index: int, num_shapes: Optional[int] = None) -> Scene:
        """The scene of captioning example `index` (with `num_shapes` shapes, or 1–3)."""
        return random_scene(self._rng(index, _CAPTION), self.size_range, num_shapes=num_shapes)

    def caption(self, index: int, num_shapes: Optional[int] = None) -> Sample:
        """Captioning example `index`: the image, an empty question and the scene's caption (type "caption").
        `num_shapes` fixes the number of shapes (single-shape captions need no binding of colours to shapes: an
        easy start for a vision encoder trained from scratch)."""
        scene = self.caption_scene(index, num_shapes)
        return Sample(scene.render(), "", scene.caption(), "caption", scene)

    def questions(
        self, index: int, num_shapes: Optional[int] = None
    ) -> tuple[Image.Image, list[tuple[str, str, str]]]:
        """Example `index` as an image and its questions: `question_scene` with the scene rendered."""
        scene, questions = self.question_scene(index, num_shapes)
        return scene.render(), questions

    def question_scene(self, index: int, num_shapes: Optional[int] = None) -> tuple[Scene, list[tuple[str, str, str]]]:
        """The scene of example `index` (with `num_shapes` shapes, or 1–3) and every question of the dataset's types that
        its scene allows, as (question, answer, type): the colour of each shape, the shape of each colour, the count,
        the description, left or right for up to `position_questions` ordered pairs of shapes, and the word when
        one is written.

        Training asks each question on its own after the shared image (`collate_question_branches`), so one answer
        never gives away another (a description, for instance, names every colour).

        When the drawn scene allows none of the dataset's types (e.g. `num_shapes=1` for a dataset of position
        questions), a scene for its first type is drawn instead, whatever `num_shapes` says.
        """
        rng = self._rng(index, _QUESTIONS)
        scene = random_scene(rng, self.size_range, num_shapes=num_shapes)
        if not any(_answerable(scene, kind) for kind in self.question_types):
            scene = scene_for_question(rng, self.question_types[0], self.size_range)
        shapes = scene.shapes
        questions = []
        for kind in self.question_types:
            if not _answerable(scene, kind):
                continue
            if kind == "color":
                questions += [(*color_question(shape), kind) for shape in shapes]
            elif kind == "shape":
                questions += [(*shape_question(shape), kind) for shape in shapes]
            elif kind == "position":
                pairs = list(itertools.permutations(range(len(shapes)), 2))
                for pair in rng.permutation(len(pairs))[: self.position_questions]:
                    questions.append((*position_question(shapes, *pairs[pair]), kind))
            else:
                questions.append((*make_question(scene, kind, rng), kind))
        return scene, questions

    def text_example(self, index: int) -> tuple[str, str]:
        """Text-only example `index` for text pre-training: (question, answer) where the question states the scene
        in words first ("the image shows a red circle and a blue square.\\nWhat color is the circle?", "red")."""
        rng = self._rng(index, _TEXT)
        question_type = self.question_types[index % len(self.question_types)]
        scene = scene_for_question(rng, question_type, self.size_range)
        question, answer = make_question(scene, question_type, rng)
        return f"{scene.text()}\n{question}", answer


def example_sample() -> Sample:
    """The README's example image (two shapes and a word) with "What color is the circle?" and its answer."""
    rng = np.random.default_rng([2025, 10, 8565])
    while True:
        scene = random_scene(rng, (224, 256), num_shapes=2, with_word=True)
        circles = [shape for shape in scene.shapes if shape.kind == "circle"]
        if circles:
            return Sample(scene.render(), "What color is the circle?", circles[0].color, "color", scene)


def save_example(folder: Union[str, Path]) -> Path:
    """Writes the README's example to `folder`: `shapes.png` and `shapes.json` ({"question": …, "answer": …})."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sample = example_sample()
    sample.image.save(folder / "shapes.png")
    record = {"question": sample.question, "answer": sample.answer}
    (folder / "shapes.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder / "shapes.png"


def save_finetune_example(folder: Union[str, Path], num_images: int = 8, seed: int = 7) -> Path:
    """Writes a small fine-tuning dataset in the chat format of `navil finetune` to `folder`: `num_images` PNG images
    (64–96 px) and `train.jsonl` with, per image, a caption and a two-turn conversation (the colour of its first
    shape, then the shape of that colour) and, per pair of consecutive images, a description of both. Returns the
    path of `train.jsonl`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(seed=seed, size_range=(64, 96))

    def message(role, text, images=0):
        return {"role": role, "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}

    lines, captions = [], []
    for index in range(num_images):
        sample = data.caption(index)
        name = f"shapes_{index}.png"
        sample.image.save(folder / name)
        captions.append(sample.answer)
        lines.append({"messages": [message("user", "Describe the image.", 1), message("assistant", sample.answer)]})
        lines[-1]["images"] = [name]
        shape = sample.scene.shapes[0]
        messages = [message("user", color_question(shape)[0], 1), message("assistant", color_question(shape)[1])]
        messages += [message("user", shape_question(shape)[0]), message("assistant", shape_question(shape)[1])]
        lines.append({"messages": messages, "images": [name]})
    for index in range(num_images - 1):
        messages = [
            message("user", "Describe both images.", 2),
            message("assistant", f"first {captions[index]}; then {captions[index + 1]}"),
        ]
        lines.append({"messages": messages, "images": [f"shapes_{index}.png", f"shapes_{index + 1}.png"]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
