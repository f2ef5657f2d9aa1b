"""Packed training batches: whole examples fill a token budget, and the language model attends within each example.

Public API (what `navil finetune --packing` and the recipe use):

    encode = NaViLDataCollator(processor, multiscale=...).encode        # example -> (ids, labels, image inputs)
    dataset = PackedDataset(examples, encode, max_packed_tokens=8192, strategy="greedy" | "best_fit")
    dataset = PackedIterableDataset(iterable, encode, max_packed_tokens=8192, strategy=..., buffer_size=64)
    collator = PackingCollator(processor, loss_reduction="token" | "sample" | "square")
    trainer = packing_trainer_class(Trainer)(model=..., train_dataset=dataset, data_collator=collator, ...)

A dataset item is a *pack*: a list of `EncodedExample`s whose lengths add up to at most `max_packed_tokens`. Examples
are never cut, so no `<img> … </img>` block is ever split. `PackingCollator` lays the packs of a batch one after
another in a single row ([1, tokens], no padding) with `position_ids` that restart at 0 for every example and no
`attention_mask`: the model recognises packed sequences by the restarts and attends within each example only
(per-example attention with sdpa, transformers' varlen flash attention, per-example masks otherwise). Each example is
computed exactly as it would be alone.

Loss reduction (InternVL's options), as weights on the target tokens: "token" (every target token weighs 1), "sample"
(each example's targets weigh 1/n, n its number of target tokens, so every example counts the same) and "square"
(1/sqrt(n)). The loss is sum(weight * cross-entropy) / sum(weight) over the whole global batch: all gradient
accumulation steps and all processes. The collator cannot see the global batch, so `PackingTrainerMixin` sums the
weights of the micro-batches of each optimizer step (`Trainer.get_batch_samples`), gathers the sum over processes,
and divides by it; with N processes the loss is multiplied by N because DDP averages gradients. Several processes
therefore train exactly as one process with the same global batch (with `average_tokens_across_devices=True`, the
default of transformers 5).
"""

import itertools
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable, NamedTuple, Optional

import torch

from ..configuration_navil import IMG_CONTEXT_TOKEN
from .collators import _image_tensors, _pad_id, end_of_turn_id

logger = logging.getLogger(__name__)

LOSS_REDUCTIONS = ("token", "sample", "square")
STRATEGIES = ("greedy", "best_fit")
TOO_LONG = ("error", "skip")
# Keys of a packed batch that are not arguments of the model's forward; `packed_loss` reads them.
PACKING_KEYS = ("shift_labels", "loss_weights", "example_index", "example_num_images", "loss_weight_total")


class EncodedExample(NamedTuple):
    """One tokenised example: its token ids, labels (-100 where no loss) and the image processor's outputs of its
    images, in order (`NaViLDataCollator.encode` returns these three)."""

    input_ids: list[int]
    labels: list[int]
    image_inputs: list[dict]


def plan_packs(lengths: Sequence[int], max_packed_tokens: int, strategy: str = "greedy") -> list[list[int]]:
    """Indices of the examples in each pack: every example once, each pack's lengths adding up to at most
    `max_packed_tokens` (every length must fit).

    "greedy" keeps the order and starts a new pack when the next example does not fit in the current one; "best_fit"
    places the examples longest first, each in the fullest pack it fits in (best-fit decreasing), which wastes less of
    the budget. Examples inside a pack keep their order.
    """
    _check_budget(max_packed_tokens)
    _check_choice("strategy", strategy, STRATEGIES)
    packs, free = [], []
    if strategy == "greedy":
        for index, length in enumerate(lengths):
            if not packs or length > free[-1]:
                packs.append([])
                free.append(max_packed_tokens)
            packs[-1].append(index)
            free[-1] -= length
        return packs
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [pack for pack, space in enumerate(free) if space >= lengths[index]]
        if fits:
            pack = min(fits, key=lambda p: free[p])
        else:
            pack = len(packs)
            packs.append([])
            free.append(max_packed_tokens)
        packs[pack].append(index)
        free[pack] -= lengths[index]
    return [sorted(pack) for pack in packs]


def _check_budget(max_packed_tokens) -> None:
    if isinstance(max_packed_tokens, bool) or not isinstance(max_packed_tokens, int) or max_packed_tokens < 1:
        raise ValueError(f"max_packed_tokens must be a positive whole number, got {max_packed_tokens!r}.")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


class _Packer:
    """What both packed datasets share: encoding, and what to do with an example longer than the budget."""

    def __init__(self, encode: Callable, max_packed_tokens: int, strategy: str, too_long: str):
        _check_budget(max_packed_tokens)
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("too_long", too_long, TOO_LONG)
        self.encode = encode
        self.max_packed_tokens = max_packed_tokens
        self.strategy = strategy
        self.too_long = too_long
        self.num_skipped = 0

    def encoded(self, example) -> EncodedExample:
        return EncodedExample(*self.encode(example))

    def fits(self, length: int, where: str) -> bool:
        """Whether an example of `length` tokens fits the budget; raises or logs (and counts) one that does not."""
        if length <= self.max_packed_tokens:
            return True
        message = (
            f"{where} has {length} tokens, more than max_packed_tokens={self.max_packed_tokens}; examples are never "
            "cut (that could split an image block)."
        )
        if self.too_long == "error":
            raise ValueError(
                f"{message} Raise max_packed_tokens, use smaller images (the image processor's max_pixels), or pass "
                "too_long='skip' to leave such examples out."
            )
        self.num_skipped += 1
        logger.warning("Skipped: %s (%d skipped so far)", message, self.num_skipped)
        return False


class PackedDataset(torch.utils.data.Dataset, _Packer):
    """Packs of whole examples from a map-style dataset (a list, a `datasets.Dataset`, …): item `i` is the list of
    `EncodedExample`s of pack `i`, for `PackingCollator`.

    The packs are planned once, before training, from every example's length (each example is encoded once for it,
    or `lengths` gives them), so an example longer than `max_packed_tokens` is found before step 1: an error naming
    it (`too_long="error"`), or it is left out with a logged warning and counted in `num_skipped` (`"skip"`). Items
    encode their examples again when read (in the data loader's workers), so no pixels are held in memory.

    Args:
        examples: The examples, each as `encode` takes it.
        encode (`Callable`): example -> `(input_ids, labels, image_inputs)`, e.g. `NaViLDataCollator(...).encode`.
        max_packed_tokens (`int`): The token budget of a pack.
        strategy (`str`): "greedy" (keep the order) or "best_fit" (best-fit decreasing, fuller packs).
        too_long (`str`): "error" or "skip" for an example longer than the budget.
        lengths (`Sequence[int]`, *optional*): The examples' token counts, when already known.
    """

    def __init__(
        self,
        examples: Sequence,
        encode: Callable,
        max_packed_tokens: int,
        strategy: str = "greedy",
        too_long: str = "error",
        lengths: Optional[Sequence[int]] = None,
    ):
        _Packer.__init__(self, encode, max_packed_tokens, strategy, too_long)
        self.examples = examples
        if lengths is None:
            lengths = [len(self.encoded(example).input_ids) for example in examples]
        if len(lengths) != len(examples):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(examples)} examples; give one per example.")
        kept = [index for index, length in enumerate(lengths) if self.fits(length, f"Example {index}")]
        self.lengths = [lengths[index] for index in kept]
        self.packs = [[kept[i] for i in pack] for pack in plan_packs(self.lengths, max_packed_tokens, strategy)]

    def __len__(self) -> int:
        return len(self.packs)

    def as_index_dataset(self):
        """A `datasets.Dataset` of `{"pack_index": i}` rows, for trainers that take only `datasets` datasets (TRL's
        `SFTTrainer`); `PackingCollator(..., packs=self)` reads each pack through its index."""
        import datasets

        return datasets.Dataset.from_dict({"pack_index": list(range(len(self)))})

    def __getitem__(self, index: int) -> list[EncodedExample]:
        return [self.encoded(self.examples[i]) for i in self.packs[index]]


class PackedIterableDataset(torch.utils.data.IterableDataset, _Packer):
    """Packs of whole examples from an iterable (a stream): each item is a list of `EncodedExample`s for
    `PackingCollator`.

    "greedy" emits the current pack when the next example does not fit; "best_fit" keeps up to `buffer_size` open
    packs, places each example in the fullest one it fits in, and emits the fullest pack when a new one must be
    opened beyond `buffer_size`. An example longer than `max_packed_tokens` raises an error naming its position in
    the stream (`too_long="error"`) or is skipped with a logged warning and counted in `num_skipped` (`"skip"`).
    Arguments as `PackedDataset`, with the examples given as any iterable. With several data-loader workers, each
    packs every `num_workers`-th example of a plain iterable; an `IterableDataset` source shards itself.
    """

    def __init__(
        self,
        examples: Iterable,
        encode: Callable,
        max_packed_tokens: int,
        strategy: str = "greedy",
        too_long: str = "error",
        buffer_size: int = 64,
    ):
        _Packer.__init__(self, encode, max_packed_tokens, strategy, too_long)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive whole number, got {buffer_size!r}.")
        self.examples = examples
        self.buffer_size = buffer_size if strategy == "best_fit" else 1

    def __iter__(self):
        examples = enumerate(self.examples)
        worker = torch.utils.data.get_worker_info()
        if worker is not None and not isinstance(self.examples, torch.utils.data.IterableDataset):
            # a plain iterable is read whole by every data-loader worker: each keeps its share
            examples = itertools.islice(examples, worker.id, None, worker.num_workers)
        packs, free = [], []  # open packs, and the budget each has left
        for position, example in examples:
            encoded = self.encoded(example)
            length = len(encoded.input_ids)
            if not self.fits(length, f"The example at position {position} of the stream"):
                continue
            fits = [pack for pack, space in enumerate(free) if space >= length]
            if not fits:
                if len(packs) == self.buffer_size:
                    fullest = min(range(len(packs)), key=free.__getitem__)
                    yield packs.pop(fullest)
                    free.pop(fullest)
                packs.append([])
                free.append(self.max_packed_tokens)
                fits = [len(packs) - 1]
            pack = min(fits, key=free.__getitem__)
            packs[pack].append(encoded)
            free[pack] -= length
        yield from packs


def example_loss_weight(num_targets: int, loss_reduction: str) -> float:
    """The weight of each target token of an example with `num_targets` of them: 1 ("token"), 1/n ("sample") or
    1/sqrt(n) ("square")."""
    if loss_reduction == "token" or num_targets == 0:
        return 1.0
    return 1.0 / (num_targets if loss_reduction == "sample" else math.sqrt(num_targets))


class PackingCollator:
    """One training row from a batch of packs (`PackedDataset` items).

    The examples of all packs lie one after another in a single row, without padding (`pad_to_multiple_of` pads
    the end with one padding segment, e.g. for fixed shapes): `input_ids`, `labels` and `position_ids` ([1, tokens]),
    positions restarting at 0 for every example, no `attention_mask` (the model attends within each example), and
    with images `pixel_values`, `image_grid_thw`, `num_scales` in prompt order. Also `shift_labels` (the target of
    each position, -100 at the last token of an example and where the target is an image token), `loss_weights`
    (the weight of each target, see `example_loss_weight`), `example_index` (the example of each token, -1 for
    padding) and `example_num_images` ([examples]): `packed_loss` reads them, `split_model_inputs` removes them
    before the model's forward.

    Args:
        processor ([`NaViLProcessor`]): The model's processor (for the padding and image-context ids).
        loss_reduction (`str`): "token", "sample" or "square".
        pad_to_multiple_of (`int`, *optional*): Pads the row to a multiple of this many tokens.
        packs ([`PackedDataset`], *optional*): Where items `{"pack_index": i}` (`PackedDataset.as_index_dataset`)
            take their pack.
    """

    def __init__(
        self,
        processor,
        loss_reduction: str = "token",
        pad_to_multiple_of: Optional[int] = None,
        packs: Optional[PackedDataset] = None,
    ):
        _check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        if pad_to_multiple_of is not None:
            _check_budget(pad_to_multiple_of)
        self.loss_reduction = loss_reduction
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packs = packs
        self.pad_id = _pad_id(processor.tokenizer, end_of_turn_id(processor))
        self.image_context_id = processor.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)

    def __call__(self, packs: list) -> dict[str, torch.Tensor]:
        if any(isinstance(pack, Mapping) for pack in packs):
            if self.packs is None:
                raise ValueError(
                    "The batch holds {'pack_index': i} rows but the collator has no packs to read them from; pass "
                    "PackingCollator(..., packs=packed_dataset)."
                )
            packs = [self.packs[pack["pack_index"]] if isinstance(pack, Mapping) else pack for pack in packs]
        examples = [EncodedExample(*example) for pack in packs for example in pack]
        if not examples:
            raise ValueError("The batch holds no examples; every pack is empty.")
        ids, labels, positions, targets, weights, owner, images = [], [], [], [], [], [], []
        for index, example in enumerate(examples):
            length = len(example.input_ids)
            if length == 0 or len(example.labels) != length:
                raise ValueError(
                    f"Example {index} of the batch has {length} token ids and {len(example.labels)} labels; an "
                    "encoded example needs one label per token id, and at least one token."
                )
            shifted = [
                -100 if token == self.image_context_id else label
                for label, token in zip(example.labels[1:], example.input_ids[1:])
            ] + [-100]
            weight = example_loss_weight(sum(label != -100 for label in shifted), self.loss_reduction)
            ids += example.input_ids
            labels += example.labels
            positions += range(length)
            targets += shifted
            weights += [weight if label != -100 else 0.0 for label in shifted]
            owner += [index] * length
            images += example.image_inputs
        padding = (-len(ids)) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_id] * padding]),
            "position_ids": torch.tensor([positions + list(range(padding))]),
            "labels": torch.tensor([labels + [-100] * padding]),
            "shift_labels": torch.tensor([targets + [-100] * padding]),
            "loss_weights": torch.tensor([weights + [0.0] * padding]),
            "example_index": torch.tensor([owner + [-1] * padding]),
            "example_num_images": torch.tensor([len(example.image_inputs) for example in examples]),
        }
        if images:
            batch.update(_image_tensors(images))
        return batch


def split_model_inputs(batch: dict) -> tuple[dict, dict]:
    """`(model inputs, packing fields)` of a packed batch: the packing fields are `PACKING_KEYS` and `labels`
    (`shift_labels` carries the targets of a packed row)."""
    packing = {key: batch[key] for key in (*PACKING_KEYS, "labels") if key in batch}
    return {key: value for key, value in batch.items() if key not in packing}, packing


def token_losses(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position's target ([batch, seq], 0 where the target is -100), in float32."""
    targets = shift_labels.to(logits.device)
    losses = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    )
    return losses.view(targets.shape)


def packed_loss(
    logits: torch.Tensor, packing: dict, total_weight: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss, token losses)`: sum(loss_weights * cross-entropy) / `total_weight` (the weights of the global batch;
    this batch's own sum when None) for the packing fields of `split_model_inputs`."""
    losses = token_losses(logits, packing["shift_labels"])
    weights = packing["loss_weights"].to(losses.device)
    total = weights.sum() if total_weight is None else torch.as_tensor(total_weight, device=losses.device)
    return (losses * weights).sum() / total.clamp(min=torch.finfo(torch.float32).tiny), losses


def packed_loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """`train_loop(loss_fn=packed_loss_fn)`: the model on a `PackingCollator` batch, with the batch's reduction."""
    inputs, packing = split_model_inputs(batch)
    return packed_loss(model(**inputs).logits, packing)[0]


def packed_batches(dataset: PackedDataset, collator: PackingCollator, packs_per_step: int = 1) -> Callable:
    """Step -> packed batch, for the recipe's `train_loop(packed_batches(...), steps, ..., loss_fn=packed_loss_fn)`:
    step `s` trains on packs `s * packs_per_step` onwards, going round `dataset` again when it runs out."""
    _check_budget(packs_per_step)

    def batch(step: int) -> dict:
        first = step * packs_per_step
        return collator([dataset[index % len(dataset)] for index in range(first, first + packs_per_step)])

    return batch


class PackingTrainerMixin:
    """`Trainer` (or TRL `SFTTrainer`) for `PackingCollator` batches: the loss of the collator's reduction over the
    whole global batch (see the module docstring), and in the logs `tokens_per_s` (real tokens of the training steps
    since the last log, per second), `padding_share`, and the token-mean loss on examples with images (`loss_image`)
    and without (`loss_text`), through whatever `report_to` names. Use `packing_trainer_class(Trainer)`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the loss is normalised over the accumulated batch here; Trainer must not divide it again
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._packing_sums = self._empty_sums()

    @staticmethod
    def _empty_sums() -> dict:
        return dict(tokens=0, padding=0, start=time.perf_counter(), image=[0.0, 0], text=[0.0, 0])

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        if not batches or "loss_weights" not in batches[0]:
            return batches, count
        total = sum(batch["loss_weights"].sum() for batch in batches).to(self.args.device)
        if self._averages_across_processes():
            total = self.accelerator.gather(total[None]).sum()
        for batch in batches:
            batch["loss_weight_total"] = total
        return batches, total

    def _averages_across_processes(self) -> bool:
        return self.accelerator.num_processes > 1 and getattr(self.args, "average_tokens_across_devices", False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, packing = split_model_inputs(inputs)
        if "loss_weights" not in packing:
            raise ValueError(
                "PackingTrainerMixin trains on PackingCollator batches; this batch has no loss_weights. Pass "
                "data_collator=PackingCollator(processor) and a PackedDataset."
            )
        total = packing.get("loss_weight_total")
        outputs = model(**inputs)
        loss, losses = packed_loss(outputs.logits, packing, total)
        if total is not None and self._averages_across_processes():
            loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients
        if model.training:
            self._count(packing, losses.detach())
        return (loss, outputs) if return_outputs else loss

    def _count(self, packing: dict, losses: torch.Tensor) -> None:
        sums = self._packing_sums
        owner = packing["example_index"].to(losses.device)
        sums["tokens"] += int((owner >= 0).sum())
        sums["padding"] += int((owner < 0).sum())
        has_image = packing["example_num_images"].to(losses.device)[owner.clamp(min=0)] > 0
        targets = packing["shift_labels"].to(losses.device) != -100
        for key, selected in (("image", targets & has_image), ("text", targets & ~has_image)):
            sums[key][0] += float(losses[selected].sum())
            sums[key][1] += int(selected.sum())

    def log(self, logs: dict, *args, **kwargs) -> None:
        sums = self._packing_sums
        if "loss" in logs and sums["tokens"]:
            logs["tokens_per_s"] = sums["tokens"] / max(time.perf_counter() - sums["start"], 1e-9)
            logs["padding_share"] = sums["padding"] / (sums["tokens"] + sums["padding"])
            for key in ("image", "text"):
                if sums[key][1]:
                    logs[f"loss_{key}"] = sums[key][0] / sums[key][1]
            self._packing_sums = self._empty_sums()
        super().log(logs, *args, **kwargs)


def packing_trainer_class(trainer_class: type) -> type:
    """`trainer_class` (`transformers.Trainer`, TRL's `SFTTrainer`, …) with `PackingTrainerMixin`. Train with
    `remove_unused_columns=False`, a `PackedDataset` (or `PackedIterableDataset`) and a `PackingCollator`."""
    return type(f"Packing{trainer_class.__name__}", (PackingTrainerMixin, trainer_class), {})
