"""The scene supervision of the training recipe: per-token targets that line up with the image tokens, and probes whose
loss the recipe can train on."""

import pytest
import torch

from navil.tools.cli import build_parser, run_train
from navil.training import QUICK_RECIPE, TrainingArguments, load_tokenizer, navil_processor
from navil.training.collators import question_batches, scene_batches
from navil.training.configs import tiny_navil_config, tiny_text_config
from navil.training.scene_supervision import IGNORE, SCENE_TARGETS, SceneProbes, scene_targets
from navil.training.synthetic_data import COLORS, SHAPES, ShapesDataset

COLOR, KIND, LEFT, RIGHT, COUNT, OBJECT = range(len(SCENE_TARGETS) + 1)


@pytest.fixture(scope="module")
def processor():
    tokenizer = load_tokenizer()
    args = TrainingArguments()
    return navil_processor(tiny_navil_config(args, tiny_text_config(args, len(tokenizer)), tokenizer), tokenizer)


def _token_colors(processor, image, multiscale):
    """[units, 3] mean RGB of each merged token of `image`, from the image processor's own pixels."""
    image_processor = processor.image_processor
    pixels = image_processor(image, multiscale=multiscale, return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    rgb = pixels.view(len(pixels), 3, -1) * std[:, None] + mean[:, None]  # [patches, 3, P·P] in [0, 1]
    return rgb.view(-1, image_processor.merge_size**2, 3, rgb.shape[-1]).mean((1, 3)) * 255


@pytest.mark.parametrize("multiscale", [False, True])
def test_tokens_labelled_with_a_shape_show_that_shape_and_background_tokens_do_not(processor, multiscale):
    data = ShapesDataset(seed=3)
    scenes = [scene for scene in map(data.caption_scene, range(20)) if scene.word is None]  # ink would mix in
    for index, scene in enumerate(scenes[:6]):
        targets = scene_targets(processor.image_processor, scene, multiscale)
        colors = _token_colors(processor, scene.render(), multiscale)
        assert len(targets) == len(colors)
        shown = targets[:, OBJECT] >= 0
        assert shown.any() and (~shown).any()
        background_color = torch.tensor(scene.background, dtype=torch.float)
        for unit in torch.nonzero(shown).flatten().tolist():
            shape = scene.shapes[targets[unit, OBJECT]]
            # the token's colour mixes its shape's fill (at least 0.15 of it), the background and the black padding
            # of the last row and column: fractions that sum to 1
            fill = torch.tensor(shape.fill, dtype=torch.float)
            basis = torch.stack((fill, background_color, torch.zeros(3)), dim=1)  # [RGB, parts]
            system = torch.cat((basis, torch.full((1, 3), 255.0)))
            observed = torch.cat((colors[unit], torch.tensor([255.0])))
            fractions = torch.linalg.lstsq(system, observed[:, None]).solution.flatten()
            residual = (system @ fractions - observed).norm().item()
            assert fractions[0] > 0.15 and fractions.min() > -0.05 and residual < 20, (index, unit, fractions)
            assert targets[unit, COLOR] == list(COLORS).index(shape.color)
            assert targets[unit, KIND] == SHAPES.index(shape.kind)
        background = targets[~shown]
        assert (background[:, COLOR] == len(COLORS)).all() and (background[:, KIND] == len(SHAPES)).all()
        assert (background[:, LEFT] == IGNORE).all() and (background[:, RIGHT] == IGNORE).all()
        assert (targets[:, COUNT] == len(scene.shapes) - 1).all()


def test_left_and_right_targets_follow_the_left_to_right_order_of_the_shapes(processor):
    scene = next(scene for scene in map(ShapesDataset(seed=5).caption_scene, range(50)) if len(scene.shapes) == 3)
    targets = scene_targets(processor.image_processor, scene, multiscale=False)
    for index in range(3):
        own = targets[targets[:, OBJECT] == index]
        assert len(own) > 0
        assert (own[:, LEFT] == int(index > 0)).all() and (own[:, RIGHT] == int(index < 2)).all()
    # the shapes' tokens lie left to right in every row of the token grid
    columns = [torch.nonzero(targets[:, OBJECT] == index).flatten() for index in range(3)]
    grid_width = processor.image_processor(scene.render(), multiscale=False)["image_grid_thw"][0, 2].item() // 2
    means = [(units % grid_width).float().mean().item() for units in columns]
    assert means == sorted(means)


def test_batches_carry_one_target_row_per_image_token_with_shapes_numbered_over_the_batch(processor):
    data = ShapesDataset(seed=0)
    batch = question_batches(processor, data, 3, single_scale_fraction=0.5, with_scene_targets=True)(0)
    context_id = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert len(batch["scene_targets"]) == (batch["input_ids"] == context_id).sum()
    images = scene_batches(processor, data, 4, single_scale_fraction=0.5)(0)
    assert len(images["scene_targets"]) == images["image_grid_thw"].prod(-1).sum() // 4
    objects = images["scene_targets"][:, OBJECT]
    shapes = sum(len(data.caption_scene(index).shapes) for index in range(4))
    assert sorted(set(objects.tolist()) - {-1}) == list(range(shapes))


def test_probes_learn_the_scene_targets_of_fixed_features(processor):
    torch.manual_seed(0)
    targets = question_batches(processor, ShapesDataset(seed=1), 4, with_scene_targets=True)(0)["scene_targets"]
    classes = [count for _, count in SCENE_TARGETS]
    # features that carry every target as a one-hot code: a linear probe can read all of them
    one_hot = [torch.nn.functional.one_hot(targets[:, i].clamp(min=0), count) for i, count in enumerate(classes)]
    features = torch.cat(one_hot, dim=1).float()
    probes = SceneProbes(features.shape[1], decoder_layer=1)
    optimizer = torch.optim.Adam(probes.parameters(), lr=0.05)
    for _ in range(200):
        loss = probes._loss(probes.connector, features, targets) + probes.object_kind_loss(features, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = probes.accuracy(features, targets)
    assert set(accuracy) == {name for name, _ in SCENE_TARGETS}
    assert min(accuracy.values()) == 1.0


def test_quick_training_takes_the_quick_recipe_but_keeps_flags_given_explicitly(monkeypatch):
    seen = {}
    monkeypatch.setattr("navil.training.train_tiny_navil", lambda args, progress: seen.update(args=args))
    run_train(build_parser().parse_args(["train", "--quick", "--qa-steps", "7", "--quiet"]))
    for name, value in QUICK_RECIPE.items():
        assert getattr(seen["args"], name) == (7 if name == "qa_steps" else value)
    run_train(build_parser().parse_args(["train", "--quiet"]))
    assert seen["args"] == TrainingArguments()
