"""Streaming training data (navil.training.streaming): shards, shuffle buffer, sharding over ranks and DataLoader
workers, the exact checkpointable position, bad examples, and the check of a map-style dataset."""

import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, trainer_arguments
from PIL import Image
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

from navil.training import NaViLDataCollator, causal_lm_loss
from navil.training.packing import PackingCollator, packing_trainer_class
from navil.training.streaming import (
    STREAMING_TRAINING_ARGUMENTS,
    StreamedPacks,
    StreamingDataset,
    StreamingStateCallback,
    check_examples,
)

IMAGE = ROOT / "examples" / "finetune" / "shapes_0.png"


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY, trust_remote_code=True)


def text_example(number):
    return {"messages": [{"role": "user", "content": f"q {number}"}, {"role": "assistant", "content": f"a {number}"}]}


def image_example(question="What is it?"):
    user = [{"type": "image"}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "a circle"}]}


def number_of(example):
    return int(example["messages"][0]["content"].split()[1])


def write_jsonl_shards(folder, count, per_shard):
    """`count` text examples numbered 0… in JSONL shards of `per_shard` lines."""
    folder.mkdir(exist_ok=True)
    for first in range(0, count, per_shard):
        lines = [json.dumps(text_example(n)) for n in range(first, min(first + per_shard, count))]
        (folder / f"shard-{first:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def png_bytes(path=IMAGE):
    return Path(path).read_bytes()


def write_tar(path, samples):
    """A webdataset-style tar: for each (key, {suffix: bytes}) the members `key.suffix`."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def numbers(dataset, **loader):
    """The example numbers a DataLoader over `dataset` delivers, in order."""
    data = torch.utils.data.DataLoader(dataset, collate_fn=list, **loader)
    return [number_of(example) for batch in data for example in batch]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_read_every_example_exactly_once_in_the_order_of_one_process(tmp_path, num_workers):
    shards = write_jsonl_shards(tmp_path / "data", 37, 10)
    single = numbers(StreamingDataset(shards, shuffle_buffer=8, seed=3, repeat=False))
    assert sorted(single) == list(range(37)) and single != list(range(37))
    world, batch = 2, 3
    per_rank = [
        numbers(
            StreamingDataset(
                shards, shuffle_buffer=8, seed=3, rank=rank, world_size=world, batch_size=batch, repeat=False
            ),
            batch_size=batch,
            num_workers=num_workers,
        )
        for rank in range(world)
    ]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(37))
    # global batch k of one process is the k-th batch of every rank together
    for step in range(37 // (world * batch)):
        together = per_rank[0][step * batch :][:batch] + per_rank[1][step * batch :][:batch]
        assert together == single[step * world * batch :][: world * batch], step


def test_the_shuffle_buffer_and_shard_order_are_drawn_from_the_seed_and_change_with_the_epoch(tmp_path):
    shards = write_jsonl_shards(tmp_path / "data", 30, 6)
    first = numbers(StreamingDataset(shards, shuffle_buffer=5, seed=0, repeat=False))
    assert first == numbers(StreamingDataset(shards, shuffle_buffer=5, seed=0, repeat=False))
    assert first != numbers(StreamingDataset(shards, shuffle_buffer=5, seed=1, repeat=False))
    assert sorted(first) == list(range(30)) and first[:6] != list(range(6))
    two_epochs = [
        number_of(example) for example in itertools.islice(StreamingDataset(shards, shuffle_buffer=5, seed=0), 60)
    ]
    assert two_epochs[:30] == first and sorted(two_epochs[30:]) == list(range(30)) and two_epochs[30:] != first
    assert numbers(StreamingDataset(shards, repeat=False)) == list(range(30))  # no buffer: the files in order


def write_stream_with_bad_examples(folder):
    """30 good text examples in 3 shards, with invalid JSON and malformed conversations between them."""
    folder.mkdir()
    for shard in range(3):
        lines = [json.dumps(text_example(n)) for n in range(10 * shard, 10 * shard + 10)]
        lines.insert(3, '{"messages": [')
        lines.insert(7, json.dumps({"messages": [{"role": "assistant", "content": "no question"}]}))
        (folder / f"part-{shard}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_continues_at_the_exact_next_example_with_none_seen_twice_or_skipped(tmp_path, num_workers):
    shards = write_stream_with_bad_examples(tmp_path / "data")
    settings = dict(shuffle_buffer=7, seed=5, batch_size=2)
    loader = dict(batch_size=2, num_workers=num_workers, collate_fn=list)
    uninterrupted = torch.utils.data.DataLoader(StreamingDataset(shards, **settings), **loader)
    uninterrupted = [number_of(example) for batch in itertools.islice(uninterrupted, 30) for example in batch]
    assert set(uninterrupted) == set(range(30))  # the bad examples left out
    dataset = StreamingDataset(shards, **settings)
    seen, data = [], iter(torch.utils.data.DataLoader(dataset, **loader))
    for batch in itertools.islice(data, 13):  # 26 examples; the workers have read further ahead
        seen += [number_of(example) for example in batch]
    state = json.loads(json.dumps(dataset.state_dict(26, num_workers)))
    del data
    resumed = StreamingDataset(shards, **settings)
    resumed.load_state_dict(state)
    data = torch.utils.data.DataLoader(resumed, **loader)
    rest = [number_of(example) for batch in itertools.islice(data, 17) for example in batch]
    assert seen + rest == uninterrupted  # nothing repeated or left out, into the next epoch


def test_a_saved_position_refuses_another_stream_and_another_worker_count(tmp_path):
    shards = write_jsonl_shards(tmp_path / "data", 12, 6)
    dataset = StreamingDataset(shards, shuffle_buffer=4, seed=0)
    list(itertools.islice(dataset, 5))
    state = dataset.state_dict(5)
    with pytest.raises(ValueError, match="another data stream.*seed"):
        StreamingDataset(shards, shuffle_buffer=4, seed=1).load_state_dict(state)
    resumed = StreamingDataset(shards, shuffle_buffer=4, seed=0)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="same dataloader_num_workers"):
        next(iter(torch.utils.data.DataLoader(resumed, num_workers=2, collate_fn=list)))


def test_bad_examples_are_skipped_counted_and_logged_with_their_file_line_or_tar_member(processor, tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    too_long = {"messages": text_example(0)["messages"] * 40 + image_example()["messages"]}  # the image at the end
    lines = [
        json.dumps(text_example(0)),
        '{"messages": [',  # line 2
        json.dumps({**image_example(), "images": []}),  # line 3: a placeholder without its image
        json.dumps({**image_example(), "images": ["missing.png"]}),  # line 4
        json.dumps({**too_long, "images": [str(IMAGE)]}),  # line 5
        json.dumps({**image_example(), "images": [str(IMAGE)]}),
    ]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    good = {"json": json.dumps(image_example()).encode(), "png": png_bytes()}
    samples = [
        ("s0", good),
        ("s1", {"json": json.dumps(image_example()).encode(), "png": b"not a png"}),
        ("s2", {"json": json.dumps(text_example(1)).encode(), "png": png_bytes()}),  # an image without placeholder
        ("s3", {"json": json.dumps(text_example(2)).encode()}),
    ]
    write_tar(folder / "b.tar", samples)
    dataset = StreamingDataset(folder, processor=processor, max_length=120, multiscale=False, repeat=False)
    with caplog.at_level(logging.WARNING, logger="navil.training.streaming"):
        examples = list(dataset)
    assert len(examples) == 4
    assert all(isinstance(image, Image.Image) for example in examples for image in example["images"])
    assert dataset.skipped == {
        "invalid JSON": 1,
        "placeholder mismatch": 2,
        "undecodable image": 2,
        "over-long": 1,
    }
    logged = caplog.text
    for source in ("a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "a.jsonl:5", "b.tar:s1", "b.tar:s2"):
        assert source + ":" in logged, source
    assert "cuts through an image" in logged and "(6 so far)" in logged
    batch = NaViLDataCollator(processor, multiscale=False)(examples)  # what is left trains
    assert batch["image_grid_thw"].shape[0] == 2


def test_a_datasets_iterable_dataset_streams_through_the_same_checks(processor):
    datasets = pytest.importorskip("datasets")
    rows = [text_example(n) for n in range(6)] + [{"messages": [{"role": "user", "content": "only a question"}]}]
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=2)
    dataset = StreamingDataset(stream, processor=processor, shuffle_buffer=3, seed=0, repeat=False)
    assert sorted(number_of(example) for example in dataset) == list(range(6))
    assert dataset.skipped == {"malformed conversation": 1}
    # with DataLoader workers the dataset deals the examples out itself: none is lost to datasets' own worker split
    assert sorted(numbers(dataset, batch_size=2, num_workers=2)) == list(range(6))


def test_a_map_style_dataset_is_checked_completely_before_the_first_step(processor, caplog):
    examples = [{**image_example(), "images": [str(IMAGE)]}, text_example(1), {**image_example(), "images": []}]
    examples.append({**image_example(), "images": [str(IMAGE.parent / "missing.png")]})
    with caplog.at_level(logging.WARNING, logger="navil.training.streaming"):
        checked = check_examples(examples, processor, sources=["t.jsonl:1", "t.jsonl:2", "t.jsonl:3", "t.jsonl:4"])
    assert checked.examples == examples[:2]
    assert checked.skipped == [("t.jsonl:3", "placeholder mismatch"), ("t.jsonl:4", "undecodable image")]
    assert "t.jsonl:4: undecodable image" in caplog.text
    with pytest.raises(ValueError, match="None of the 2 examples"):
        check_examples(examples[2:])


def test_a_list_of_examples_streams_like_a_dataset_and_a_list_of_paths_as_shards(tmp_path):
    examples = [text_example(n) for n in range(5)]
    assert numbers(StreamingDataset(examples, repeat=False)) == list(range(5))
    shards = write_jsonl_shards(tmp_path / "data", 6, 3)
    assert numbers(StreamingDataset(sorted(shards.iterdir())[::-1], repeat=False)) == [3, 4, 5, 0, 1, 2]


class RecordingCollator(NaViLDataCollator):
    """Remembers the numbers of the examples of every batch it builds."""

    def __init__(self, processor):
        super().__init__(processor)
        self.seen = []

    def __call__(self, examples):
        self.seen += [number_of(example) for example in examples]
        return super().__call__(examples)


def checkpointed_stream_arguments(output_dir, **overrides):
    """The `TrainingArguments` of a seeded run on a stream that saves a checkpoint every `save_steps`."""
    settings = dict(learning_rate=5e-4, save_strategy="steps", seed=0, **STREAMING_TRAINING_ARGUMENTS)
    return TrainingArguments(**trainer_arguments(output_dir, **settings, **overrides))


def train_recording(trainer_class, model, args, train_dataset, collator, resume, **trainer_kwargs):
    """Trains `model` on the stream `train_dataset` with a recording `collator`, keeping the stream's position; returns
    what the collator saw and the model."""
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[StreamingStateCallback(train_dataset)],
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    return collator.seen, model


def train_streaming(processor, shards, output_dir, resume=None, accumulation=1):
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(TINY, trust_remote_code=True)
    dataset = StreamingDataset(shards, processor=processor, shuffle_buffer=4, seed=0)
    args = checkpointed_stream_arguments(
        output_dir,
        max_steps=6 // accumulation,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        save_steps=3 // accumulation,
    )
    collator = RecordingCollator(processor)
    return train_recording(Trainer, model, args, dataset, collator, resume, compute_loss_func=causal_lm_loss)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_a_trainer_resumed_from_a_checkpoint_continues_the_stream_and_ends_with_the_same_weights(
    processor, tmp_path, accumulation
):
    shards = write_jsonl_shards(tmp_path / "data", 9, 4)  # 12 examples per run: the stream wraps into epoch 2
    seen, model = train_streaming(processor, shards, tmp_path / "whole", accumulation=accumulation)
    checkpoint = tmp_path / "whole" / f"checkpoint-{3 // accumulation}"
    assert (checkpoint / "data_state_rank0.json").is_file()
    resumed_seen, resumed = train_streaming(processor, shards, tmp_path / "whole", checkpoint, accumulation)
    assert resumed_seen[:6] == seen[6:12]  # after the 6 examples of the first half (the DataLoader reads ahead)
    for (name, weight), (_, expected) in zip(resumed.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=name)


class RecordingPackingCollator(PackingCollator):
    """Remembers the token ids of the examples of every batch of packs it builds."""

    def __init__(self, processor):
        super().__init__(processor)
        self.seen = []

    def __call__(self, packs):
        self.seen.append([tuple(example[0]) for pack in packs for example in pack])
        return super().__call__(packs)


def train_packed_stream(processor, shards, output_dir, resume=None):
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(TINY, trust_remote_code=True)
    stream = StreamingDataset(shards, processor=processor, shuffle_buffer=4, seed=0)
    packs = StreamedPacks(stream, NaViLDataCollator(processor).encode, max_packed_tokens=96)
    args = checkpointed_stream_arguments(output_dir, max_steps=6, per_device_train_batch_size=1, save_steps=3)
    collator = RecordingPackingCollator(processor)
    return train_recording(packing_trainer_class(Trainer), model, args, packs, collator, resume)


def test_a_packed_stream_resumed_from_a_checkpoint_makes_the_same_packs_and_ends_with_the_same_weights(
    processor, tmp_path
):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [json.dumps({**text_example(n), "messages": text_example(n)["messages"] * (1 + n % 3)}) for n in range(9)]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")  # 1 to 3 turns: packs of different sizes
    seen, model = train_packed_stream(processor, folder, tmp_path / "whole")
    assert len({len(batch) for batch in seen[:6]}) > 1
    resumed_seen, resumed = train_packed_stream(
        processor, folder, tmp_path / "whole", tmp_path / "whole" / "checkpoint-3"
    )
    assert resumed_seen[:3] == seen[3:6]
    for (name, weight), (_, expected) in zip(resumed.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=name)


def one_step_trainer(tmp_path, train_dataset, data_collator, stream, **arguments):
    """A `Trainer` of the embedded model for one step on `train_dataset`, keeping the position of `stream`."""
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, **arguments
    )
    return Trainer(
        model=AutoModel.from_pretrained(TINY, trust_remote_code=True),
        args=args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        callbacks=[StreamingStateCallback(stream)],
    )


def test_a_trainer_without_the_streaming_arguments_is_refused_before_the_first_step(processor, tmp_path):
    dataset = StreamingDataset(write_jsonl_shards(tmp_path / "data", 4, 4), processor=processor)
    trainer = one_step_trainer(tmp_path, dataset, NaViLDataCollator(processor), dataset)
    with pytest.raises(ValueError, match="STREAMING_TRAINING_ARGUMENTS"):
        trainer.train()


def test_a_trainer_reading_the_stream_through_a_wrapper_is_refused_rather_than_resumed_at_a_wrong_position(
    processor, tmp_path
):
    from navil.training.packing import PackedIterableDataset

    dataset = StreamingDataset(write_jsonl_shards(tmp_path / "data", 4, 4), processor=processor)
    packs = PackedIterableDataset(dataset, NaViLDataCollator(processor).encode, max_packed_tokens=256)
    trainer = one_step_trainer(tmp_path, packs, PackingCollator(processor), dataset, **STREAMING_TRAINING_ARGUMENTS)
    with pytest.raises(ValueError, match="reads a PackedIterableDataset, not the dataset"):
        trainer.train()


# `navil finetune` that also writes the numbers of the examples of every batch its collator builds to SEEN_LOG (one
# line per batch), and can kill itself with SIGKILL after a step (test_resume.py's launcher).
RECORDING_LAUNCHER = """
import json, os
from navil.training import NaViLDataCollator

collate = NaViLDataCollator.__call__


def recording_collate(self, examples):
    with open(os.environ["SEEN_LOG"], "a") as log:
        log.write(json.dumps([example["messages"][0]["content"] for example in examples]) + "\\n")
    return collate(self, examples)


NaViLDataCollator.__call__ = recording_collate
"""


def streamed_finetune(launcher, shards, output_dir, seen_log, *flags, kill_after=None):
    """`navil finetune --streaming` over `shards` for 10 steps of 2, a checkpoint every 3 steps; returns the process
    and the batches its collator built (accelerate reads one batch ahead: the last one built is not trained on)."""
    command = [
        sys.executable,
        str(launcher),
        "finetune",
        "--streaming",
        "--data",
        str(shards),
        "--shuffle-buffer",
        "4",
    ]
    command += ["--max-steps", "10", "--save-steps", "3", "--batch-size", "2", "--learning-rate", "5e-4"]
    command += ["--output-dir", str(output_dir), "--quiet", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEN_LOG": str(seen_log), "KILL_AFTER_STEP": str(kill_after or -1)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")
    batches = [json.loads(line) for line in seen_log.read_text().splitlines()] if seen_log.exists() else []
    return result, batches


@pytest.mark.multiprocess
def test_a_streamed_navil_finetune_killed_and_resumed_sees_every_example_once_and_ends_with_the_same_weights(tmp_path):
    from test_resume import KILLING_LAUNCHER, assert_same_weights

    shards = write_jsonl_shards(tmp_path / "data", 15, 5)  # 20 examples per run: the stream wraps into epoch 2
    launcher = tmp_path / "launcher.py"
    launcher.write_text(RECORDING_LAUNCHER + KILLING_LAUNCHER)
    whole, expected = streamed_finetune(launcher, shards, tmp_path / "whole", tmp_path / "whole.log")
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = expected[:10]  # the batch read ahead of step 10 was never trained on
    assert sorted(sum(expected, [])[:15]) == sorted(f"q {n}" for n in range(15))
    killed, before = streamed_finetune(launcher, shards, tmp_path / "run", tmp_path / "killed.log", kill_after=7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert before[:7] == expected[:7]
    resumed, after = streamed_finetune(launcher, shards, tmp_path / "run", tmp_path / "resumed.log", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert after[:4] == expected[6:]  # from checkpoint-6: steps 7-10, nothing seen twice or skipped
    assert_same_weights(tmp_path / "run", tmp_path / "whole")


def test_navil_finetune_streaming_asks_for_max_steps_and_names_a_data_path_without_shards(tmp_path, capsys):
    from navil.tools.cli import main

    with pytest.raises(SystemExit, match="give the run's length with --max-steps"):
        main(["finetune", "--streaming", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"No \.jsonl or \.tar shard at .*empty"):
        StreamingDataset(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(FileNotFoundError, match="a folder of shards or a glob"):
        StreamingDataset(str(tmp_path / "*.txt"))
