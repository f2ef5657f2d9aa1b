"""Linear probes: how well a NaViL checkpoint's visual tokens encode colour, shape and the written word.

    python benchmarks/vision_probes.py [--model checkpoints/navil-tiny] [--images 300] [--threads 2]

Draws images of one shape and one word from the synthetic dataset (training sizes, single scale), takes the
connector outputs (the LLM's visual inputs) averaged over the tokens inside the shape's and the word's bounding
boxes, fits a logistic regression on two thirds of the images and prints its accuracy on the rest: the shape's colour
(6 classes), its kind (4) and the word (10). A randomly initialised model of the embedded shape is probed next to it
for reference. docs/experiments.md discusses the numbers.
"""

import argparse
import math

import numpy as np
import torch

from navil import NaViLForConditionalGeneration
from navil.modeling_navil import get_window_index
from navil.tools.cli import load_model
from navil.training import TrainingArguments, tiny_navil_config, tiny_text_config
from navil.training.synthetic_data import COLORS, SHAPES, TRAIN_SIZE_RANGE, WORDS, random_scene

PROBE_SEED = 4242


def box_mask(box, scene, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h · grid_w] raster mask of the merged tokens that overlap `box` = (x0, y0, x1, y1) in scene pixels."""
    sx, sy = grid_w / scene.width, grid_h / scene.height
    x0, y0, x1, y1 = box
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    mask[max(0, int(y0 * sy)) : max(1, math.ceil(y1 * sy)), max(0, int(x0 * sx)) : max(1, math.ceil(x1 * sx))] = True
    return mask.flatten()


@torch.no_grad()
def probe_features(model, processor, num_images: int):
    """Per image: mean connector output inside the shape's box and inside the word's box; and the three labels."""
    vision = model.config.vision_config
    shape_features, word_features, labels = [], [], []
    for index in range(num_images):
        rng = np.random.default_rng([PROBE_SEED, index])
        scene = random_scene(rng, TRAIN_SIZE_RANGE, num_shapes=1, with_word=True)
        inputs = processor.image_processor(scene.render(), return_tensors="pt", multiscale=False)
        _, h, w = inputs["image_grid_thw"][0].tolist()
        grid_h, grid_w = h // vision.merge_size, w // vision.merge_size
        features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        window_index, _ = get_window_index(inputs["image_grid_thw"], vision.window_size, vision.merge_size)
        raster = torch.empty_like(features)
        raster[window_index] = features

        shape = scene.shapes[0]
        radius = shape.size / 2
        shape_box = (
            shape.center[0] - radius,
            shape.center[1] - radius,
            shape.center[0] + radius,
            shape.center[1] + radius,
        )
        shape_features.append(raster[box_mask(shape_box, scene, grid_h, grid_w)].mean(0))
        word_features.append(raster[box_mask(scene.word_box, scene, grid_h, grid_w)].mean(0))
        labels.append((list(COLORS).index(shape.color), SHAPES.index(shape.kind), WORDS.index(scene.word)))
    return torch.stack(shape_features), torch.stack(word_features), torch.tensor(labels)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 500) -> float:
    """Test accuracy of a logistic regression fitted on the first two thirds (features standardised on them)."""
    torch.manual_seed(0)
    split = 2 * len(labels) // 3
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-6
    features = (features - mean) / std
    classifier = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(classifier(features[:split]), labels[:split])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (classifier(features[split:]).argmax(-1) == labels[split:]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a NaViL folder or Hub id (default: the embedded tiny model)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    trained, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    processor = trained.chat_processor(tokenizer)
    shape = TrainingArguments()
    torch.manual_seed(0)
    random_init = NaViLForConditionalGeneration(
        tiny_navil_config(shape, tiny_text_config(shape, len(tokenizer)), tokenizer)
    ).eval()

    print(f"{'visual tokens of':<28} {'colour (6)':>10} {'shape (4)':>10} {'word (10)':>10}")
    for name, model in ((args.model or "navil-tiny", trained), ("random initialisation", random_init)):
        shape_features, word_features, labels = probe_features(model, processor, args.images)
        accuracies = (
            probe_accuracy(shape_features, labels[:, 0], len(COLORS)),
            probe_accuracy(shape_features, labels[:, 1], len(SHAPES)),
            probe_accuracy(word_features, labels[:, 2], len(WORDS)),
        )
        print(f"{name[-28:]:<28} " + " ".join(f"{100 * value:>9.0f}%" for value in accuracies))


if __name__ == "__main__":
    main()
