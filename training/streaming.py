"""Streaming training data for corpora that do not fit on disk or in memory, with an exact, checkpointable position.

`StreamingDataset` is a `torch.utils.data.IterableDataset` over JSONL shards, webdataset-style tar shards (the
members of one example share a key: `0001.json` holds the conversation, `0001.png` or `0001.0.jpg`, `0001.1.jpg`
its images, in name order) and `datasets` iterable datasets. Every pass over the data (an epoch) reads the shards in
an order drawn from the seed, mixes the examples through a seeded shuffle buffer and deals the resulting stream out
in blocks of `batch_size` examples: block `q` goes to rank `q % world_size` and, on that rank, to DataLoader worker
`(q // world_size) % num_workers`. The DataLoader takes one batch from each worker in turn, so every example is
decoded and trained on by exactly one rank and worker (each reads the raw records, cheaply, to keep the order), and
the batches come in the same order whatever the number of workers.

Bad examples (invalid JSON, a malformed conversation, an undecodable image, a placeholder count that differs from the
images, an example whose images `max_length` would cut) are skipped, counted and logged with their source: the
file and line of a JSONL shard, the tar member, or the index in a `datasets` dataset. `check_examples` does the same
for a map-style dataset, completely, before the first step.

The position is exact: `state_dict(examples_consumed)` gives, for every worker, the epoch and the number of items of
its stream read up to the last example the trainer consumed (the DataLoader and accelerate read ahead; a small
shared-memory log of each worker's progress per example undoes that); `load_state_dict` makes the next iteration
continue at the exact next example. Resuming re-reads the raw records of the current epoch up to that point (no
image is decoded, no example tokenised) to rebuild the shuffle buffer. `StreamingStateCallback` saves the position
into every `Trainer` checkpoint (`data_state_rank{N}.json`) and restores it when a run resumes; `StreamedPacks` packs
a stream greedily and keeps that position exact.
"""

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from accelerate.data_loader import IterableDatasetShard
from PIL import Image
from transformers import TrainerCallback

from ..processing_navil import NaViLProcessor
from .finetune import NaViLDataCollator, conversation_turns
from .packing import PackedIterableDataset

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl", ".tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DATA_STATE_FILE = "data_state_rank{rank}.json"
# What a `Trainer` over a `StreamingDataset` needs: resume from the saved data position instead of re-reading (and
# discarding) every consumed batch, and no dispatching of whole batches from rank 0 (accelerate would concatenate
# padded batches of different lengths); each rank then reads its part through accelerate's `IterableDatasetShard`.
STREAMING_TRAINING_ARGUMENTS = {"ignore_data_skip": True, "accelerator_config": {"dispatch_batches": False}}
BAD_EXAMPLE_KINDS = (
    "invalid JSON",
    "malformed conversation",
    "placeholder mismatch",
    "undecodable image",
    "over-long",
)
_URL = re.compile(r"^[a-z]+://")


class BadExample(ValueError):
    """A training example that cannot be trained on: `source` says where it came from, `kind` which of
    `BAD_EXAMPLE_KINDS` it is, `reason` what exactly is wrong."""

    def __init__(self, source: str, kind: str, reason: str):
        super().__init__(f"{source}: {kind}: {reason}")
        self.source, self.kind, self.reason = source, kind, reason


class Record(NamedTuple):
    """One raw example before decoding: where it came from, how it is stored, and the stored payload."""

    source: str
    kind: str  # "jsonl": a line of text; "tar": {member suffix: bytes}; "example": a dict
    payload: object
    folder: Optional[Path] = None  # relative image paths of a JSONL shard are resolved against it


def find_shards(data: Union[str, Path, Sequence[Union[str, Path]]]) -> list[Path]:
    """The shard files of `data`: a `.jsonl` or `.tar` file, a folder (its `.jsonl` and `.tar` files), a glob pattern
    or a list of these, in sorted order. Raises `FileNotFoundError` naming the pattern that matched nothing."""
    if isinstance(data, (list, tuple)):
        return [shard for item in data for shard in find_shards(item)]
    path = Path(data)
    if path.is_dir():
        shards = sorted(item for item in path.iterdir() if item.suffix in SHARD_SUFFIXES)
    elif path.is_file():
        shards = [path]
    else:
        shards = sorted(Path(item) for item in glob.glob(str(data)) if Path(item).suffix in SHARD_SUFFIXES)
    if not shards:
        raise FileNotFoundError(
            f"No .jsonl or .tar shard at {data}; pass a shard file, a folder of shards or a glob such as "
            "'data/train-*.tar'."
        )
    return shards


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield Record(f"{path}:{number}", "jsonl", line, path.parent)


def _read_tar(path: Path) -> Iterator[Record]:
    """The examples of a webdataset-style tar: consecutive members sharing a key (the member's name up to the first
    dot of its base name), read as a stream so that the shard need not be seekable."""
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, _, suffix = name.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and members:
                yield Record(f"{path}:{key}", "tar", members)
                members = {}
            key = member_key
            members[suffix] = tar.extractfile(member).read()
    if members:
        yield Record(f"{path}:{key}", "tar", members)


def _read_examples(name: str, examples: Iterable) -> Iterator[Record]:
    """The examples of an iterable, each one. A `datasets.IterableDataset` is read through its `iter` (rows of one),
    since iterating it in a DataLoader worker would give the worker only its own share of the dataset's shards, and
    `StreamingDataset` deals the examples out to its workers itself."""
    if type(examples).__module__.startswith("datasets.") and hasattr(examples, "iter"):
        examples = ({key: values[0] for key, values in row.items()} for row in examples.iter(batch_size=1))
    for index, example in enumerate(examples):
        yield Record(f"{name}[{index}]", "example", example)


def _open_image(image, source: str):
    """A decoded PIL image of `image` (a PIL image, a path, bytes or `datasets`' `{"bytes", "path"}`); URLs are left
    to the image processor."""
    if isinstance(image, Image.Image) or (isinstance(image, str) and _URL.match(image)):
        return image
    if isinstance(image, Mapping):
        image = image.get("bytes") or image.get("path")
    try:
        opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        opened.load()
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise BadExample(source, "undecodable image", f"{type(error).__name__}: {error}") from None
    return opened


def _kind_of(error: ValueError) -> str:
    """The kind of bad example a conversation's `ValueError` (from `conversation_turns` or `encode_turns`) names."""
    return "placeholder mismatch" if re.search("image blocks?|placeholders", str(error)) else "malformed conversation"


def decode_record(record: Record) -> dict:
    """The example `{"messages": [...], "images": [decoded images]}` of a raw record; raises `BadExample` when its
    JSON or its conversation is invalid or an image cannot be decoded."""
    if record.kind == "example":
        example = dict(record.payload)
    else:
        text = record.payload if record.kind == "jsonl" else record.payload.get("json")
        if text is None:
            raise BadExample(record.source, "malformed conversation", "no .json member next to the images")
        try:
            example = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadExample(record.source, "invalid JSON", str(error)) from None
        if not isinstance(example, dict):
            raise BadExample(record.source, "malformed conversation", "the JSON is not an object")
    if record.kind == "tar":
        members = [record.payload[suffix] for suffix in sorted(record.payload) if suffix != "json"]
        if example.get("images"):
            reason = "give the images as tar members next to the .json, not under 'images'"
            raise BadExample(record.source, "malformed conversation", reason)
        example["images"] = members
    elif record.folder is not None:
        example["images"] = [
            str(record.folder / image) if isinstance(image, str) and not _URL.match(image) else image
            for image in example.get("images") or []
        ]
    try:
        conversation_turns(example)
    except ValueError as error:
        raise BadExample(record.source, _kind_of(error), str(error)) from None
    example["images"] = [_open_image(image, record.source) for image in example.get("images") or []]
    return example


def check_example(example: dict, source: str, collator: Optional[NaViLDataCollator]) -> None:
    """Raises `BadExample` when `collator` cannot train on `example`: its placeholders do not match its images, or
    `collator.max_length` would cut through an image (the collator would drop it)."""
    if collator is None:
        return
    try:
        ids, _, _ = collator.encode(example)
    except (ValueError, OSError) as error:
        raise BadExample(source, _kind_of(error), str(error)) from None
    if collator.max_length is not None and len(ids) > collator.max_length:
        last_image_end = max((i for i, token in enumerate(ids) if token == collator.image_end_id), default=-1)
        if last_image_end >= collator.max_length:
            reason = f"{len(ids)} tokens, and max_length={collator.max_length} cuts through an image"
            raise BadExample(source, "over-long", reason)


class CheckedExamples(NamedTuple):
    """What `check_examples` found: the examples that train, and `(source, kind)` of each one skipped."""

    examples: list
    skipped: list[tuple[str, str]]


def check_examples(
    examples: Sequence,
    processor: Optional[NaViLProcessor] = None,
    max_length: Optional[int] = None,
    multiscale: Optional[bool] = None,
    sources: Optional[Sequence[str]] = None,
) -> CheckedExamples:
    """Checks every example of a map-style dataset before the first step, as `StreamingDataset` checks each streamed
    one: the conversation, every image decoded, and (with `processor`) the placeholders against the images and
    `max_length` against the images. Bad examples are logged with their source (`sources[i]`, else `example i`) and
    left out. Raises `ValueError` when none is left."""
    collator = NaViLDataCollator(processor, max_length, multiscale) if processor is not None else None
    kept, skipped = [], []
    for index, example in enumerate(examples):
        source = sources[index] if sources is not None else f"example {index}"
        try:
            decoded = decode_record(Record(source, "example", example))
            check_example(decoded, source, collator)
        except BadExample as error:
            logger.warning("skipped a bad training example, %s", error)
            skipped.append((error.source, error.kind))
            continue
        kept.append(example)
    if not kept:
        raise ValueError(f"None of the {len(skipped)} examples can be trained on; the first: {skipped[0]}.")
    return CheckedExamples(kept, skipped)


class StreamingDataset(torch.utils.data.IterableDataset):
    """Training examples streamed from shards, shuffled, sharded over ranks and DataLoader workers, and checked.

    Args:
        data: Shard files, folders or glob patterns (`find_shards`), or a `datasets.IterableDataset` (or any
            re-iterable of example dicts), read in its own order.
        processor ([`NaViLProcessor`], *optional*): With it, each example is also tokenised to check its
            placeholders and length (`max_length`, `multiscale` as in `NaViLDataCollator`).
        shuffle_buffer (`int`): Examples mixed at a time; 0 or 1 reads the shards in order, unshuffled.
        seed (`int`): Seeds the shard order and the buffer, per epoch.
        rank, world_size (`int`): This process's part of the stream. Leave them at 0 and 1 under `Trainer`, whose
            accelerate `IterableDatasetShard` splits the stream between processes itself.
        batch_size (`int`): Examples of this dataset per DataLoader batch (under `Trainer`: the per-device batch
            times the number of processes), the block in which the stream is dealt out.
        repeat (`bool`): Start the next epoch when one ends (a stream without end), or stop.
        history (`int`): Examples per worker whose position is remembered, more than the DataLoader reads ahead.

    Yields examples `{"messages": [...], "images": [PIL images]}` for `NaViLDataCollator`; `skipped` counts the bad
    ones by reason in this process (each DataLoader worker counts its own; `state_dict` holds the totals).
    """

    MAX_WORKERS = 64

    def __init__(
        self,
        data,
        *,
        processor: Optional[NaViLProcessor] = None,
        max_length: Optional[int] = None,
        multiscale: Optional[bool] = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        repeat: bool = True,
        history: int = 4096,
    ):
        for name, value, low in (("shuffle_buffer", shuffle_buffer, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}.")
        for name, value in (("batch_size", batch_size), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank!r}.")
        paths = data if isinstance(data, (list, tuple)) else [data]
        if all(isinstance(item, (str, Path)) for item in paths):
            self.shards, self.examples = find_shards(data), None
        else:
            if not isinstance(data, Iterable):
                raise TypeError(f"data must be shard paths or an iterable dataset, got {type(data).__name__}.")
            self.shards, self.examples = [], data
        self.collator = NaViLDataCollator(processor, max_length, multiscale) if processor is not None else None
        self.shuffle_buffer, self.seed, self.repeat = shuffle_buffer, seed, repeat
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.skipped = Counter()
        self._resume = None
        # per worker and remembered example: (example number, epoch, items of its stream read, bad ones skipped)
        self._progress = torch.full((self.MAX_WORKERS, history, 4), -1, dtype=torch.long).share_memory_()

    def _fingerprint(self) -> dict:
        """What must match for a saved position to mean the same examples."""
        sources = [shard.name for shard in self.shards] or [type(self.examples).__name__]
        return dict(
            sources=sources,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
        )

    def _records(self, epoch: int) -> Iterator[Record]:
        """The raw records of one epoch, in the epoch's shard order (drawn from the seed when shuffling)."""
        if self.examples is not None:
            yield from _read_examples(type(self.examples).__name__, self.examples)
            return
        order = list(range(len(self.shards)))
        if self.shuffle_buffer > 1:
            random.Random(f"shards {self.seed} {epoch}").shuffle(order)
        for index in order:
            shard = self.shards[index]
            yield from (_read_tar(shard) if shard.suffix == ".tar" else _read_jsonl(shard))

    def _shuffled(self, epoch: int) -> Iterator[Record]:
        """The records of one epoch through the shuffle buffer: each new record takes the place of a random one
        of the buffer, which is read out; the rest of the buffer, shuffled, ends the epoch."""
        records = self._records(epoch)
        if self.shuffle_buffer <= 1:
            yield from records
            return
        generator = random.Random(f"buffer {self.seed} {epoch}")
        buffer = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            index = generator.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = record
        generator.shuffle(buffer)
        yield from buffer

    def _stream(self, epoch: int, worker: int, num_workers: int) -> Iterator[Record]:
        """This rank and worker's records of one epoch: blocks of `batch_size` dealt to the ranks, then the workers."""
        for index, record in enumerate(self._shuffled(epoch)):
            block = index // self.batch_size
            if block % self.world_size == self.rank and (block // self.world_size) % num_workers == worker:
                yield record

    def _start(self, worker: int, num_workers: int) -> tuple[int, int, int, int]:
        """(role, epoch, items to pass over, bad ones skipped so far) where DataLoader worker `worker` starts. Its
        role is the worker of the interrupted run whose stream it continues: the DataLoader asks worker 0 first, and
        that is the worker whose turn came next."""
        if self._resume is None:
            return worker, 0, 0, 0
        if len(self._resume["workers"]) != num_workers:
            raise ValueError(
                f"The saved data position is of {len(self._resume['workers'])} DataLoader workers but this run has "
                f"{num_workers}; resume with the same dataloader_num_workers (0 counts as 1)."
            )
        role = (worker + self._resume["next_worker"]) % num_workers
        start = self._resume["workers"][role]
        return role, start["epoch"], start["position"], start["skipped"]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers > self.MAX_WORKERS:
            raise ValueError(f"StreamingDataset follows at most {self.MAX_WORKERS} DataLoader workers per process.")
        role, epoch, passed, skipped = self._start(worker, num_workers)
        progress, history = self._progress[worker], self._progress.shape[1]
        count = 0
        while True:
            yielded = False
            for position, record in enumerate(self._stream(epoch, role, num_workers), start=1):
                if position <= passed:
                    continue
                try:
                    example = decode_record(record)
                    check_example(example, record.source, self.collator)
                except BadExample as error:
                    skipped += 1
                    self.skipped[error.kind] += 1
                    logger.warning("skipped a bad training example (%d so far), %s", skipped, error)
                    continue
                progress[count % history] = torch.tensor([count, epoch, position, skipped])
                count += 1
                yielded = True
                yield example
            if not self.repeat:
                return
            if not yielded and passed == 0:
                raise ValueError(
                    f"Worker {role} of rank {self.rank} got no trainable example in epoch {epoch}: the data hold "
                    f"fewer blocks of batch_size={self.batch_size} than ranks x workers, or only bad examples."
                )
            epoch, passed = epoch + 1, 0

    def state_dict(self, examples_consumed: int, num_workers: int = 0) -> dict:
        """The position after the first `examples_consumed` examples this process's DataLoader (with
        `num_workers` workers, taking one batch of `batch_size` from each in turn) delivered since the iteration
        began: per worker, its epoch, the items of its stream read and the bad ones skipped."""
        workers = max(num_workers, 1)
        batches, rest = divmod(examples_consumed, self.batch_size)
        if rest and workers > 1:
            raise ValueError(
                f"{examples_consumed} examples consumed is not a whole number of batches of {self.batch_size}."
            )
        states = [None] * workers
        for worker in range(workers):
            delivered = len(range(worker, batches, workers)) * self.batch_size + (rest if workers == 1 else 0)
            role, epoch, passed, skipped = self._start(worker, workers)
            if delivered:
                history = self._progress.shape[1]
                number, epoch, passed, skipped = self._progress[worker, (delivered - 1) % history].tolist()
                if number != delivered - 1:
                    raise ValueError(
                        f"Worker {worker} has no record of its example {delivered - 1} (it remembers {history}); "
                        "raise the dataset's history above what the DataLoader reads ahead."
                    )
            states[role] = {"epoch": epoch, "position": passed, "skipped": skipped}
        next_worker = ((self._resume or {}).get("next_worker", 0) + batches) % workers
        return {"format": 1, **self._fingerprint(), "workers": states, "next_worker": next_worker}

    def load_state_dict(self, state: Mapping) -> None:
        """Makes the next iteration continue right after the position `state` (from `state_dict`) describes."""
        mismatched = {
            name: (state.get(name), value) for name, value in self._fingerprint().items() if state.get(name) != value
        }
        if state.get("format") != 1 or mismatched:
            raise ValueError(
                f"The saved data position is of another data stream (saved, now: {mismatched}); resume with the "
                "same shards, shuffle_buffer, seed, ranks and batch size."
            )
        self._resume = {"workers": [dict(worker) for worker in state["workers"]], "next_worker": state["next_worker"]}


class StreamedPacks(PackedIterableDataset):
    """Greedy packs of whole examples (`PackedIterableDataset`) of a `StreamingDataset`, whose position
    `StreamingStateCallback` saves and restores like the stream's own.

    Greedy packing of a stream is exact to resume: a pack is emitted when the next example does not fit, and that
    example starts the next pack, so packing again from the first example after the consumed packs makes the same
    packs. Each pack's count of stream examples (its own and those too long for the budget, skipped before it) is
    remembered for the last `history` packs, as `StreamingDataset` remembers its examples. Read it without DataLoader
    workers (`dataloader_num_workers=0`; the stream's image decoding then runs in the training process)."""

    def __init__(
        self, stream: StreamingDataset, encode, max_packed_tokens: int, too_long: str = "error", history=4096
    ):
        if not isinstance(stream, StreamingDataset):
            raise TypeError(f"StreamedPacks packs a StreamingDataset, got {type(stream).__name__}.")
        super().__init__(stream, encode, max_packed_tokens, strategy="greedy", too_long=too_long)
        # per remembered pack: (pack number, examples of the stream up to the end of the pack)
        self._read = torch.full((history, 2), -1, dtype=torch.long)

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise ValueError("StreamedPacks keeps its position in the training process; use dataloader_num_workers=0.")
        skipped_before, read = self.num_skipped, 0
        for number, pack in enumerate(super().__iter__()):
            read += len(pack)
            self._read[number % len(self._read)] = torch.tensor([number, read + self.num_skipped - skipped_before])
            yield pack

    def examples_read(self, packs_consumed: int) -> int:
        """Examples of the stream the first `packs_consumed` packs of the current iteration took."""
        if packs_consumed == 0:
            return 0
        number, read = self._read[(packs_consumed - 1) % len(self._read)].tolist()
        if number != packs_consumed - 1:
            raise ValueError(f"No record of pack {packs_consumed - 1}; raise StreamedPacks' history.")
        return read


class StreamingStateCallback(TrainerCallback):
    """Saves the position of a `StreamingDataset` (or of its `StreamedPacks`) in each `Trainer` checkpoint, as
    `data_state_rank{N}.json` (one per process), and restores it when the run resumes, so that training continues at
    the exact next example.

    Use it with `TrainingArguments(**STREAMING_TRAINING_ARGUMENTS, ...)`. On resume the position is read from
    `resume_from_checkpoint`, else `args.resume_from_checkpoint`, else the `checkpoint-<step>` folder of the resumed
    step in `args.output_dir`. A checkpointing routine that writes a checkpoint elsewhere first calls `save(folder,
    args, state)` itself.
    """

    def __init__(
        self,
        dataset: Union[StreamingDataset, StreamedPacks],
        resume_from_checkpoint: Optional[Union[str, Path]] = None,
    ):
        self.dataset = dataset
        self.stream = dataset.examples if isinstance(dataset, StreamedPacks) else dataset
        self.resume_from_checkpoint = resume_from_checkpoint
        self.first_step = 0

    def _examples_per_step(self, args) -> int:
        """Items (examples, or packs) this process's dataset delivers per optimizer step."""
        processes = args.world_size if self.stream.world_size == 1 else 1
        per_batch = args.per_device_train_batch_size * processes
        if args.dataloader_num_workers > 0 and per_batch != self.stream.batch_size:
            raise ValueError(
                f"The DataLoader takes {per_batch} examples of the dataset per batch but the dataset deals them out in "
                f"blocks of batch_size={self.stream.batch_size}; make them equal."
            )
        return per_batch * args.gradient_accumulation_steps

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.ignore_data_skip or (
            args.world_size > 1 and args.accelerator_config.dispatch_batches is not False
        ):
            raise ValueError(
                "A StreamingDataset needs TrainingArguments(ignore_data_skip=True, accelerator_config="
                "{'dispatch_batches': False}): pass **STREAMING_TRAINING_ARGUMENTS."
            )
        self._examples_per_step(args)
        read = getattr(kwargs.get("train_dataloader"), "dataset", None)
        if isinstance(read, IterableDatasetShard):  # accelerate's split of the stream between processes
            read = read.dataset
        if read is not None and read is not self.dataset:
            raise ValueError(
                f"The trainer reads a {type(read).__name__}, not the dataset whose position this callback saves: the "
                "position counts one item of the dataset per DataLoader item, which another wrapper breaks. Train on "
                "the StreamingDataset itself, or on its StreamedPacks, for an exact resume."
            )
        self.first_step = state.global_step
        if state.global_step == 0:
            return
        folder = self.resume_from_checkpoint or args.resume_from_checkpoint
        folder = Path(folder or Path(args.output_dir) / f"checkpoint-{state.global_step}")
        path = folder / DATA_STATE_FILE.format(rank=args.process_index)
        if not path.is_file():
            raise FileNotFoundError(
                f"No data position at {path}: the checkpoint was saved without StreamingStateCallback, so the run "
                "cannot continue at the next example. Resume from a checkpoint of a streaming run."
            )
        self.stream.load_state_dict(json.loads(path.read_text()))

    def save(self, folder: Union[str, Path], args, state) -> None:
        """Writes this process's data position after `state.global_step` steps into the checkpoint `folder`."""
        consumed = (state.global_step - self.first_step) * self._examples_per_step(args)
        if isinstance(self.dataset, StreamedPacks):
            consumed = self.dataset.examples_read(consumed)
        data_state = self.stream.state_dict(consumed, args.dataloader_num_workers)
        path = Path(folder) / DATA_STATE_FILE.format(rank=args.process_index)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data_state) + "\n")
        os.replace(temporary, path)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and not (folder / DATA_STATE_FILE.format(rank=args.process_index)).exists():
            self.save(folder, args, state)
