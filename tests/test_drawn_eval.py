"""The held-out drawn set (`training/drawn_shapes.py`, `navil eval --drawn`): shapes drawn with Pillow's primitives,
checked against their own pixels, asked with the training set's phrasings."""

import itertools
from pathlib import Path

import numpy as np
import pytest

import navil
from navil.tools.cli import main
from navil.training.drawn_shapes import (
    DRAWN_QUESTION_TYPES,
    DRAWN_SHAPES,
    DRAWN_SIZE_RANGE,
    GAP,
    MARGIN,
    DrawnShapesDataset,
)
from navil.training.synthetic_data import (
    COLORS,
    NUMBER_WORDS,
    Scene,
    Shape,
    ShapesDataset,
    color_question,
    position_question,
    shape_question,
)

CHECKPOINT = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
NUM_SAMPLES = 60


@pytest.fixture(scope="module")
def samples():
    data = DrawnShapesDataset(seed=5)
    return [data[index] for index in range(NUM_SAMPLES)]


def nearest_color(pixel) -> str:
    return min(COLORS, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(pixel, COLORS[name])))


def shapes_in_pixels(image, background) -> list[Shape]:
    """The shapes an image shows, found from its pixels alone: runs of columns holding non-background pixels, left
    to right; each one's colour is the nearest of `COLORS` to its pixels' median, its kind follows from how much of
    its bounding box it fills (square ≈ 1, circle ≈ π/4, triangle ≈ ½)."""
    pixels = np.asarray(image).astype(int)
    ink = np.abs(pixels - np.array(background)).max(-1) > 40  # (height, width)
    columns = np.flatnonzero(ink.any(0))
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    shapes = []
    for run in runs:
        x0, x1 = run[0], run[-1]
        rows = np.flatnonzero(ink[:, x0 : x1 + 1].any(1))
        y0, y1 = rows[0], rows[-1]
        mask = ink[y0 : y1 + 1, x0 : x1 + 1]
        fill = np.median(pixels[y0 : y1 + 1, x0 : x1 + 1][mask], axis=0)
        ratio = mask.mean()
        kind = "square" if ratio > 0.93 else "circle" if ratio > 0.65 else "triangle"
        center = ((x0 + x1) / 2, (y0 + y1) / 2)
        shapes.append(Shape(kind, nearest_color(fill), tuple(int(v) for v in fill), center, float(x1 - x0 + 1)))
    return shapes


def answers_from_pixels(shapes: list[Shape]) -> dict[str, str]:
    """Every question the drawn set may ask about these shapes, with its answer, built by the training set's helpers."""
    answers = dict(color_question(shape) for shape in shapes)
    answers.update(shape_question(shape) for shape in shapes)
    answers.update(position_question(shapes, *pair) for pair in itertools.permutations(range(len(shapes)), 2))
    count_question = ShapesDataset(seed=0, question_types=("count",))[0].question
    describe_question = ShapesDataset(seed=0, question_types=("describe",))[0].question
    answers[count_question] = NUMBER_WORDS[len(shapes)]
    answers[describe_question] = Scene(1, 1, (255, 255, 255), tuple(shapes)).describe()
    return answers


def test_drawn_items_are_deterministic_and_seed_dependent():
    first, again, other = DrawnShapesDataset(seed=3)[7], DrawnShapesDataset(seed=3)[7], DrawnShapesDataset(seed=4)[7]
    assert (first.question, first.answer, first.scene) == (again.question, again.answer, again.scene)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.scene != other.scene
    assert np.array_equal(np.asarray(first.scene.render()), np.asarray(first.image))


def test_drawn_items_cycle_through_every_question_type_but_ocr(samples):
    assert DRAWN_QUESTION_TYPES == ("color", "shape", "count", "describe", "position")
    assert [sample.question_type for sample in samples] == [
        DRAWN_QUESTION_TYPES[index % len(DRAWN_QUESTION_TYPES)] for index in range(NUM_SAMPLES)
    ]
    for sample in samples:
        shapes = sample.scene.shapes
        assert 1 <= len(shapes) <= 3 and sample.scene.word is None
        assert len({shape.kind for shape in shapes}) == len({shape.color for shape in shapes}) == len(shapes)
        assert {shape.kind for shape in shapes} <= set(DRAWN_SHAPES)
        if sample.question_type == "position":
            assert len(shapes) >= 2


def test_drawn_image_sides_are_200_to_480_pixels_with_an_aspect_ratio_within_5_to_3(samples):
    low, high = DRAWN_SIZE_RANGE
    sizes = [sample.image.size for sample in samples]
    assert all(low <= side <= high for size in sizes for side in size)
    assert all(3 / 5 <= width / height <= 5 / 3 for width, height in sizes)
    assert len({width for width, _ in sizes}) > NUM_SAMPLES // 2  # sides vary independently
    assert any(width > height for width, height in sizes) and any(width < height for width, height in sizes)


def test_drawn_shapes_lie_inside_the_image_separated_horizontally_from_left_to_right(samples):
    for sample in samples:
        width, height = sample.image.size
        shortest = min(width, height)
        boxes = [shape.box for shape in sample.scene.shapes]
        for x0, y0, x1, y1 in boxes:
            assert MARGIN <= x0 and x1 < width - MARGIN and MARGIN <= y0 and y1 < height - MARGIN
            assert 0.25 * shortest - 1 <= x1 - x0 + 1 <= 0.45 * shortest
        assert all(left[2] + GAP < right[0] for left, right in zip(boxes, boxes[1:]))


def test_drawn_proportions_differ_from_the_training_renderer(samples):
    for shape in (shape for sample in samples for shape in sample.scene.shapes):
        x0, y0, x1, y1 = shape.box
        ratio = (y1 - y0 + 1) / (x1 - x0 + 1)
        if shape.kind == "circle":
            assert ratio == 1
        elif shape.kind == "square":
            assert 0.85 - 0.02 <= ratio <= 1.15 + 0.02
        else:  # isosceles, apex up
            assert 0.8 - 0.02 <= ratio <= 1.1 + 0.02


def test_answers_agree_with_the_drawn_pixels(samples):
    for sample in samples:
        found = shapes_in_pixels(sample.image, sample.scene.background)
        listed = sample.scene.shapes
        assert [(shape.kind, shape.color) for shape in found] == [(shape.kind, shape.color) for shape in listed]
        for shape in listed:
            x, y = (round(value) for value in shape.center)
            assert nearest_color(sample.image.getpixel((x, y))) == shape.color
        assert answers_from_pixels(found)[sample.question] == sample.answer


def test_drawn_questions_are_the_training_phrasings(samples):
    training = ShapesDataset(seed=0, question_types=DRAWN_QUESTION_TYPES)
    fixed = {kind: training[index].question for index, kind in enumerate(DRAWN_QUESTION_TYPES)}
    vocabulary = {
        "color": set(COLORS),
        "shape": set(DRAWN_SHAPES),
        "count": set(NUMBER_WORDS[1:4]),
        "position": {"left", "right"},
    }
    for sample in samples:
        shapes = sample.scene.shapes
        if sample.question_type in ("count", "describe"):
            assert sample.question == fixed[sample.question_type]
        if sample.question_type == "describe":
            assert sample.answer == Scene(1, 1, (255, 255, 255), shapes).describe()
        else:
            assert sample.answer in vocabulary[sample.question_type]
        phrasings = {
            "color": [color_question(shape) for shape in shapes],
            "shape": [shape_question(shape) for shape in shapes],
            "position": [position_question(shapes, *pair) for pair in itertools.permutations(range(len(shapes)), 2)],
        }
        if sample.question_type in phrasings:
            assert (sample.question, sample.answer) in phrasings[sample.question_type]


def test_drawn_set_refuses_question_types_it_cannot_ask():
    with pytest.raises(ValueError, match="no words"):
        DrawnShapesDataset(question_types=("color", "ocr"))
    with pytest.raises(ValueError, match="got \\[\\]"):
        DrawnShapesDataset(question_types=())


@pytest.mark.skipif(not CHECKPOINT.is_dir(), reason="checkpoints/navil-tiny is not trained yet")
def test_navil_eval_drawn_prints_accuracy_per_type_on_the_embedded_model(capsys):
    arguments = ["eval", "--drawn", "--num-questions", "10", "--batch-size", "5", "--seed", "7", "--quiet"]
    assert main(arguments) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "10 questions, shapes drawn with PIL ImageDraw, image sides 200-480 px, seed 7"
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines[3:]]
    assert rows == [*DRAWN_QUESTION_TYPES, "all"]


def test_navil_eval_refuses_drawn_together_with_out_of_range(capsys):
    with pytest.raises(SystemExit) as error:
        main(["eval", "--drawn", "--out-of-range"])
    assert error.value.code == 2
    assert "--out-of-range: not allowed with argument --drawn" in capsys.readouterr().err


def test_navil_eval_drawn_refuses_ocr_before_loading_a_model():
    with pytest.raises(ValueError, match="no words"):
        main(["eval", "--drawn", "--types", "ocr", "--model", "/nonexistent/model"])
