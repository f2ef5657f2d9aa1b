"""Dense supervision from the scene labels: what every visual token shows, as an auxiliary loss.

A departure from the paper, which trains NaViL on image-text pairs only. The synthetic scenes know which shape covers
every pixel, so each merged visual token gets targets: the colour and kind of the shape it shows (or background),
whether another shape lies to its left and to its right, and the number of shapes. Linear probes read them from the
connector's output and from the visual tokens' hidden states in the middle of the language model; their
cross-entropy is added to the answer loss. The probes are training-only: they are not part of the saved model.

The answers alone teach colour fast, shape slowly and left/right not at all in the CPU budget (docs/experiments.md):
the answer reads an attention-weighted mean of the visual tokens, so the gradient reaching any one token is weak.
A per-token target gives every token of a shape its own gradient.
"""

import copy

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..configuration_navil import IMG_CONTEXT_TOKEN
from .synthetic_data import COLORS, NUMBER_WORDS, SHAPES, Scene, _outline

# (name, number of classes) of every per-token target; background is the last class of colour and kind, and the
# left/right targets are ignored on background tokens.
SCENE_TARGETS = (
    ("color", len(COLORS) + 1),
    ("kind", len(SHAPES) + 1),
    ("left", 2),
    ("right", 2),
    ("count", len(NUMBER_WORDS) - 1),
)
IGNORE = -100
_COLOR_INDEX = {name: index for index, name in enumerate(COLORS)}


def unit_objects(image_processor, scene: Scene, multiscale: bool, min_cover: float = 0.2) -> torch.Tensor:
    """[units] the shape each merged token of the image shows, over all its scales in the image processor's order:
    k + 1 for `scene.shapes[k]` when that shape covers at least `min_cover` of the token, else 0 (background).

    The scene's shape mask goes through the image processor itself (nearest-neighbour resizing, no rescaling or
    normalisation), so the tokens line up with those of the rendered image at every scale.
    """
    mask = Image.new("RGB", (scene.width, scene.height))
    draw = ImageDraw.Draw(mask)
    for index, shape in enumerate(scene.shapes):
        draw.polygon(_outline(shape, 1), fill=(index + 1,) * 3)
    pixels = _nearest(image_processor)(
        mask, multiscale=multiscale, do_rescale=False, do_normalize=False, return_tensors="pt"
    )["pixel_values"]
    units = pixels.round().long().view(-1, image_processor.merge_size**2 * pixels.shape[-1])  # [units, pixels]
    cover = F.one_hot(units, len(scene.shapes) + 1).float().mean(1)[:, 1:]  # [units, shapes]
    best_cover, best = cover.max(-1) if len(scene.shapes) else (torch.zeros(len(units)), torch.zeros(len(units)))
    return torch.where(best_cover >= min_cover, best + 1, 0).long()


def _nearest(image_processor):
    """A copy of `image_processor` that resizes with nearest-neighbour sampling (object indices stay whole)."""
    nearest = copy.copy(image_processor)
    nearest.resample = Image.Resampling.NEAREST
    return nearest


def scene_targets(image_processor, scene: Scene, multiscale: bool) -> torch.Tensor:
    """[units, len(SCENE_TARGETS) + 1] per-token targets of one image (all its scales), in `SCENE_TARGETS` order,
    then the index of the shape each token shows (-1 for background)."""
    objects = unit_objects(image_processor, scene, multiscale)
    shapes = scene.shapes
    table = [[len(COLORS), len(SHAPES), IGNORE, IGNORE, len(shapes) - 1]]  # background
    for index, shape in enumerate(shapes):  # shapes are listed left to right
        left, right = int(index > 0), int(index < len(shapes) - 1)
        table.append([_COLOR_INDEX[shape.color], SHAPES.index(shape.kind), left, right, len(shapes) - 1])
    return torch.cat((torch.tensor(table)[objects], objects[:, None] - 1), dim=1)


class SceneProbes(nn.Module):
    """Linear probes of `SCENE_TARGETS` on the connector's output and on the visual tokens' hidden states after
    decoder layer `decoder_layer`."""

    def __init__(self, hidden_size: int, decoder_layer: int):
        super().__init__()
        classes = sum(count for _, count in SCENE_TARGETS)
        self.connector = nn.Linear(hidden_size, classes)
        self.decoder = nn.Linear(hidden_size, classes)
        self.decoder_layer = decoder_layer
        self.object_kind = nn.Linear(hidden_size, len(SHAPES))

    @staticmethod
    def _logits(probe: nn.Linear, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One [tokens, classes] tensor per target of `SCENE_TARGETS`."""
        return probe(features.float()).split([count for _, count in SCENE_TARGETS], dim=-1)

    @classmethod
    def _loss(cls, probe: nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = cls._logits(probe, features)
        losses = [F.cross_entropy(part, targets[:, i], ignore_index=IGNORE) for i, part in enumerate(logits)]
        return torch.stack([loss for loss in losses if not loss.isnan()]).mean()

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, targets: torch.Tensor, site: str = "connector") -> dict[str, float]:
        """Per-target accuracy of one probe on the tokens that have that target (shape tokens for left/right, colour and
        kind)."""
        logits = self._logits(getattr(self, site), features)
        shape_token = targets[:, 1] < len(SHAPES)
        result = {}
        for i, ((name, _), part) in enumerate(zip(SCENE_TARGETS, logits)):
            keep = targets[:, i] != IGNORE
            if name in ("color", "kind"):
                keep &= shape_token
            if keep.any():
                result[name] = (part.argmax(-1)[keep] == targets[keep, i]).float().mean().item()
        return result

    def object_kind_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each shape's kind read from the maximum of its tokens' features: the most telling token
        of a shape takes the gradient (a mean would spread it over tokens that cannot tell)."""
        objects = targets[:, -1]
        shown = objects >= 0
        count = int(objects.max()) + 1
        pooled = features.new_full((count, features.shape[-1]), float("-inf")).float()
        index = objects[shown][:, None].expand(-1, features.shape[-1])
        pooled = pooled.scatter_reduce(0, index, features[shown].float(), "amax")
        kinds = torch.full((count,), IGNORE, dtype=torch.long, device=targets.device)
        kinds[objects[shown]] = targets[shown, 1]
        present = kinds != IGNORE
        return F.cross_entropy(self.object_kind(pooled[present]), kinds[present])

    def connector_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of the probes on the connector's output: per token, and each shape's kind from its maximum."""
        return self._loss(self.connector, features, targets) + self.object_kind_loss(features, targets)

    def vision_loss(self, model, batch: dict) -> torch.Tensor:
        """The connector probes' loss alone (the language model does not run)."""
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        return self.connector_loss(torch.cat(features), batch["scene_targets"])

    def loss(self, model, batch: dict, weight: float) -> torch.Tensor:
        """The model's answer loss plus `weight` times the mean of the three probe losses (per token on the connector,
        each shape's kind from its maximum there, per token after decoder layer `decoder_layer`); `batch` holds the
        model's inputs and `scene_targets`."""
        captured = {}
        hook = model.mlp1.register_forward_hook(lambda module, args, output: captured.update(connector=output))
        inputs = {key: value for key, value in batch.items() if key != "scene_targets"}
        try:
            outputs = model(**inputs, output_hidden_states=True)
        finally:
            hook.remove()
        targets = batch["scene_targets"]
        context = batch["input_ids"] == model.special_token_id(IMG_CONTEXT_TOKEN)
        decoder_states = outputs.hidden_states[self.decoder_layer][context]  # [units, hidden], prompt order
        probes = self.connector_loss(captured["connector"], targets)
        probes = probes + self._loss(self.decoder, decoder_states, targets)
        return outputs.loss + weight * probes / 3


def batch_scene_targets(image_processor, scenes: list[Scene], flags: list[bool]) -> torch.Tensor:
    """[units of the batch, len(SCENE_TARGETS) + 1]: `scene_targets` of every image of a batch, in order, with shape
    indices counted over the batch."""
    targets, objects = [], 0
    for scene, flag in zip(scenes, flags):
        image_targets = scene_targets(image_processor, scene, flag)
        image_targets[:, -1] = torch.where(image_targets[:, -1] >= 0, image_targets[:, -1] + objects, -1)
        targets.append(image_targets)
        objects += len(scene.shapes)
    return torch.cat(targets)
