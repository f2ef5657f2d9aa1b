"""Training at scale with 2 CPU processes (gloo): streamed and packed data under `accelerate launch` (DDP, through
`navil finetune`) and `torchrun` (DDP and FSDP2, a custom loop), each following the loss curve of one process with
the same global batch, resuming a streamed run exactly, and saving checkpoints that chat. See the notes on launching
two CPU processes with accelerate in test_finetuning.py."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import finetune_command
from test_finetuning import (
    ACCELERATE_TWO_PROCESSES,
    DATA,
    ONE_THREAD,
    TINY,
    assert_chats_the_same_in_a_fresh_process,
)
from transformers import AutoModel, AutoProcessor

pytestmark = pytest.mark.multiprocess

TORCHRUN_TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY, trust_remote_code=True)


@pytest.fixture
def shards(tmp_path):
    """The example chats as 3 JSONL shards (images by absolute path)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    lines = []
    for line in DATA.read_text().splitlines():
        example = json.loads(line)
        example["images"] = [str(DATA.parent / image) for image in example["images"]]
        lines.append(json.dumps(example))
    for shard in range(3):
        (folder / f"part-{shard}.jsonl").write_text("\n".join(lines[shard::3]) + "\n")
    return folder


def finetune(launcher, shards, output_dir, batch_size, *flags):
    """`navil finetune --streaming` for 6 steps in fresh processes; the logged loss of every step."""
    command = [
        *launcher,
        "-m",
        "navil.tools.cli",
        "finetune",
        "--streaming",
        "--data",
        str(shards),
        "--shuffle-buffer",
        "8",
    ]
    command += ["--output-dir", str(output_dir), "--max-steps", "6", "--no-multiscale", "--learning-rate", "5e-4"]
    command += ["--batch-size", str(batch_size), "--save-steps", "3", "--quiet", *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output_dir / "log_history.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


def test_streamed_ddp_follows_one_process_resumes_exactly_and_its_checkpoint_chats(processor, shards, tmp_path):
    single = finetune([sys.executable], shards, tmp_path / "single", 4)
    ddp = finetune(ACCELERATE_TWO_PROCESSES, shards, tmp_path / "ddp", 2)
    assert len(ddp) == len(single) == 6
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=0, atol=1e-4)
    for rank in range(2):
        state = json.loads((tmp_path / "ddp" / "checkpoint-3" / f"data_state_rank{rank}.json").read_text())
        assert state["workers"][0]["position"] == 12  # 3 steps of 2 processes x 2 examples, read by every rank
    uninterrupted = AutoModel.from_pretrained(tmp_path / "ddp", trust_remote_code=True)
    checkpoint = tmp_path / "ddp" / "checkpoint-3"
    resumed = finetune(ACCELERATE_TWO_PROCESSES, shards, tmp_path / "ddp", 2, "--resume-from-checkpoint", checkpoint)
    torch.testing.assert_close(torch.tensor(resumed[-3:]), torch.tensor(ddp[-3:]), rtol=0, atol=1e-6)
    model = AutoModel.from_pretrained(tmp_path / "ddp", trust_remote_code=True)
    for (name, weight), (_, expected) in zip(model.state_dict().items(), uninterrupted.state_dict().items()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=name)
    saved = AutoModel.from_pretrained(tmp_path / "ddp" / "checkpoint-6", trust_remote_code=True)
    assert_chats_the_same_in_a_fresh_process(tmp_path / "ddp" / "checkpoint-6", saved, processor)


# One loop for one process and for DDP or FSDP2 under torchrun: each rank streams its part of the shards (blocks of
# its batch of 2, `StreamingDataset(rank=..., world_size=...)`), plainly padded or packed into one row, with the loss
# normalised over the global batch (DDP and FSDP average gradients, hence the factor `world`); rank 0 saves the
# gathered full state dict of the packed run.
LOOP_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from transformers import AutoModel, AutoProcessor
from navil.training import NaViLDataCollator, causal_lm_loss, close_process_group, fsdp_shard
from navil.training.packing import PackingCollator, packed_loss, split_model_inputs
from navil.training.streaming import StreamingDataset

model_dir, shards, out, parallel = sys.argv[1:5]
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
collator = NaViLDataCollator(processor, multiscale=False)
packer = PackingCollator(processor)
batch = 4 // world


def global_sum(value):
    value = torch.as_tensor(value, dtype=torch.float64).clone()
    if world > 1:
        dist.all_reduce(value)
    return value


losses = {}
for mode in ("plain", "packed"):
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).train()
    if parallel == "fsdp":
        fsdp_shard(model)
    elif parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    dataset = StreamingDataset(
        shards, processor=processor, multiscale=False, shuffle_buffer=8, seed=0, rank=rank, world_size=world,
        batch_size=batch,
    )
    data = iter(torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=list))
    losses[mode] = []
    for step in range(5):
        examples = next(data)
        if mode == "plain":
            inputs = collator(examples)
            labels = inputs.pop("labels")
            count = global_sum((labels[:, 1:] != -100).sum())
            loss = causal_lm_loss(model(**inputs), labels, num_items_in_batch=count)
        else:
            inputs, packing = split_model_inputs(packer([[collator.encode(example) for example in examples]]))
            loss, _ = packed_loss(model(**inputs).logits, packing, global_sum(packing["loss_weights"].sum()))
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses[mode].append(global_sum(loss.detach()).item())
if parallel == "fsdp":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # fully_shard changed the model's class: save the gathered weights through a plain model
        model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
        model.load_state_dict(state)
    del state
elif parallel == "ddp":
    model = model.module
if rank == 0:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    Path(out, "losses.json").write_text(json.dumps(losses))
del model, optimizer
close_process_group()
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_streamed_and_packed_follow_one_process_of_the_same_global_batch(
    processor, shards, tmp_path, parallel
):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    runs = {"single": ([sys.executable], "none"), parallel: (TORCHRUN_TWO_PROCESSES, parallel)}
    for name, (launcher, mode) in runs.items():
        command = [*launcher, str(script), str(TINY), str(shards), str(tmp_path / name), mode]
        result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, cwd="/")
        assert result.returncode == 0, result.stderr[-3000:]
    single, distributed = (json.loads((tmp_path / name / "losses.json").read_text()) for name in runs)
    for mode in ("plain", "packed"):
        assert len(distributed[mode]) == len(single[mode]) == 5
        torch.testing.assert_close(torch.tensor(distributed[mode]), torch.tensor(single[mode]), rtol=0, atol=1e-4)
    # padded and packed batches of the same examples give the same loss (the packed row attends per example)
    torch.testing.assert_close(single["packed"][0], single["plain"][0], rtol=0, atol=1e-4)
    model = AutoModel.from_pretrained(tmp_path / parallel, trust_remote_code=True)
    assert_chats_the_same_in_a_fresh_process(tmp_path / parallel, model, processor)


def test_packed_ddp_of_navil_finetune_follows_one_process_of_the_same_global_batch_and_its_checkpoint_chats(
    processor, tmp_path
):
    def packed_finetune(launcher, output_dir, batch_size):
        command = finetune_command(output_dir, launcher=launcher)
        command += ["--packing", "--max-packed-tokens", "512", "--loss-reduction", "sample", "--max-steps", "4"]
        command += ["--batch-size", str(batch_size), "--save-steps", "4", "--eval-fraction", "0", "--no-multiscale"]
        command += ["--learning-rate", "5e-4", "--quiet"]
        result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, cwd="/")
        assert result.returncode == 0, result.stderr[-3000:]
        history = json.loads((output_dir / "log_history.json").read_text())
        return [entry["loss"] for entry in history if "loss" in entry]

    # 2 packs per step: both in one process's row, or one in each process's (the weights summed over both)
    single = packed_finetune([sys.executable], tmp_path / "single", 2)
    ddp = packed_finetune(ACCELERATE_TWO_PROCESSES, tmp_path / "ddp", 1)
    assert len(ddp) == len(single) == 4
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=0, atol=1e-4)
    checkpoint = tmp_path / "ddp" / "checkpoint-4"
    saved = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    assert_chats_the_same_in_a_fresh_process(checkpoint, saved, processor)
