"""Checkpoints and resume of `navil finetune` (navil.training.checkpointing): a run killed with SIGKILL and resumed
ends with the weights of an uninterrupted run, bit for bit; every checkpoint loads and chats on its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, TINY
from safetensors.torch import load_file
from transformers import AutoModel

from navil.checks_navil import RUN_STATUS_FILE
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.tools.cli import load_model, main
from navil.training.checkpointing import STAGING_DIR

IMAGE = str(DATA.parent / "shapes_0.png")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# 20 steps of 2 examples (23 examples, 3 held out), a checkpoint every 5 steps, float32 on the CPU
RUN = ["finetune", "--data", str(DATA), "--max-steps", "20", "--save-steps", "5", "--batch-size", "2"]
RUN += ["--no-multiscale", "--learning-rate", "5e-4", "--eval-fraction", "0.13", "--quiet"]
# the same run on packs (2 packs of at most 512 tokens per step), each example's loss weighed 1/sqrt(its targets);
# with --streaming the examples come from the JSONL file as a stream
PACKED = ["--packing", "--max-packed-tokens", "512", "--loss-reduction", "square"]
STREAMED = [*PACKED, "--streaming", "--shuffle-buffer", "8"]
# `navil finetune` in a process that kills itself with SIGKILL at a chosen point: after a training step
# (KILL_AFTER_STEP) or while writing the checkpoint of a step, once its weights and optimizer are written but before
# its RNG state (KILL_WHILE_SAVING_STEP). The callback is added to Trainer's default callbacks from outside navil.
KILLING_LAUNCHER = """
import os, signal, sys
from transformers import Trainer, TrainerCallback, trainer

after_step, while_saving = (int(os.environ.get(name, -1)) for name in ("KILL_AFTER_STEP", "KILL_WHILE_SAVING_STEP"))


class KillAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == after_step:
            os.kill(os.getpid(), signal.SIGKILL)


def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == while_saving:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)


trainer.DEFAULT_CALLBACKS.append(KillAfterStep)
save_rng_state, Trainer._save_rng_state = Trainer._save_rng_state, save_rng_state_or_die
from navil.tools.cli import main

sys.exit(main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def navil_finetune(output_dir, *flags, kill=None, tmp=None):
    """Runs `navil finetune` in a fresh process; with `kill={"KILL_AFTER_STEP": "12"}` (or KILL_WHILE_SAVING_STEP) it
    dies by SIGKILL there. Returns the finished process."""
    command = [sys.executable, "-m", "navil.tools.cli"]
    env = ONE_THREAD
    if kill is not None:
        launcher = Path(tmp, "killing_launcher.py")
        launcher.write_text(KILLING_LAUNCHER)
        command, env = [sys.executable, str(launcher)], {**ONE_THREAD, **kill}
    command += [*RUN, "--output-dir", str(output_dir), *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_to_the_end(output_dir)
    return output_dir


def run_to_the_end(output_dir, *flags):
    """Runs (or with --resume finishes) `navil finetune` into `output_dir` in a fresh process, which must succeed."""
    result = navil_finetune(output_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]


def killed_run(tmp_path, *flags, **kill):
    """`navil finetune` into `tmp_path / "run"` killed by SIGKILL where `kill` says (KILL_AFTER_STEP="12" or
    KILL_WHILE_SAVING_STEP="10"); returns that folder."""
    output_dir = tmp_path / "run"
    killed = navil_finetune(output_dir, *flags, kill=kill, tmp=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    return output_dir


def checkpoint_names(output_dir):
    return sorted(path.name for path in Path(output_dir).glob("checkpoint-*"))


def losses(output_dir):
    history = json.loads(Path(output_dir, "log_history.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_same_weights(folder, reference):
    weights, expected = load_file(Path(folder, "model.safetensors")), load_file(Path(reference, "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.multiprocess
def test_a_run_killed_with_sigkill_after_step_12_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(
    uninterrupted, tmp_path
):
    output_dir = killed_run(tmp_path, KILL_AFTER_STEP="12")
    assert checkpoint_names(output_dir) == ["checkpoint-10", "checkpoint-5"]
    assert not (output_dir / "model.safetensors").exists()
    with pytest.raises(ValueError, match="unfinished save"):
        NaViLForConditionalGeneration.from_pretrained(output_dir)
    run_to_the_end(output_dir, "--resume")
    # bit for bit: the same data order, RNG, optimizer and scheduler state, and the same float32 kernels
    assert_same_weights(output_dir, uninterrupted)
    assert losses(output_dir) == losses(uninterrupted) and len(losses(output_dir)) == 20
    assert json.loads((output_dir / RUN_STATUS_FILE).read_text())["complete"] is True
    assert not (output_dir / STAGING_DIR).exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("packing", [PACKED, STREAMED], ids=["packed", "streamed-packed"])
def test_a_packed_run_killed_with_sigkill_after_step_12_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(
    packing, tmp_path
):
    uninterrupted = tmp_path / "uninterrupted"
    run_to_the_end(uninterrupted, *packing)
    output_dir = killed_run(tmp_path, *packing, KILL_AFTER_STEP="12")
    assert checkpoint_names(output_dir) == ["checkpoint-10", "checkpoint-5"]
    run_to_the_end(output_dir, *packing, "--resume")
    # bit for bit: the same packs in the same order (a stream continues at the exact next example)
    assert_same_weights(output_dir, uninterrupted)
    history = json.loads(Path(output_dir, "log_history.json").read_text())
    assert losses(output_dir) == losses(uninterrupted) and len(losses(output_dir)) == 20
    assert all("tokens_per_s" in entry for entry in history if "loss" in entry)  # the packing trainer's logs
    if "--streaming" in packing:
        assert (output_dir / "checkpoint-10" / "data_state_rank0.json").is_file()


@pytest.mark.multiprocess
def test_a_run_killed_while_writing_a_checkpoint_leaves_no_checkpoint_of_that_step_and_resumes_from_the_one_before(
    uninterrupted, tmp_path
):
    output_dir = killed_run(tmp_path, KILL_WHILE_SAVING_STEP="10")
    half_written = output_dir / STAGING_DIR / "checkpoint-10"
    assert (half_written / "model.safetensors").is_file() and not (half_written / "rng_state.pth").exists()
    assert checkpoint_names(output_dir) == ["checkpoint-5"]
    with pytest.raises(ValueError, match="unfinished save"):
        NaViLForConditionalGeneration.from_pretrained(half_written)
    run_to_the_end(output_dir, "--resume")
    assert_same_weights(output_dir, uninterrupted)


def test_every_checkpoint_loads_with_automodel_and_chats_with_navil_chat_like_the_final_model(uninterrupted, capsys):
    assert checkpoint_names(uninterrupted) == [f"checkpoint-{step}" for step in (10, 15, 20, 5)]
    checkpoint = uninterrupted / "checkpoint-20"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "tokenizer.json"):
        assert (checkpoint / name).is_file(), name
    for name in ("modeling_navil.py", "processing_navil.py", "preprocessor_config.json", "chat_template.jinja"):
        assert (checkpoint / name).is_file(), name
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    final = AutoModel.from_pretrained(uninterrupted, trust_remote_code=True)
    for (name, weight), (_, expected) in zip(model.state_dict().items(), final.state_dict().items()):
        assert torch.equal(weight, expected), name
    replies = []
    for folder in (checkpoint, uninterrupted):
        assert main(["chat", "--model", str(folder), "--image", IMAGE, "--max-new-tokens", "8", "Describe it."]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()


def test_save_total_limit_keeps_the_newest_checkpoints_and_resume_from_checkpoint_continues_from_the_one_named(
    uninterrupted, tmp_path
):
    from navil.training import finetune

    output_dir = tmp_path / "run"
    settings = dict(eval_fraction=0.13, multiscale=False, per_device_train_batch_size=2, learning_rate=5e-4)
    settings.update(use_cpu=True, disable_tqdm=True, seed=0)
    finetune(
        str(TINY),
        DATA,
        str(output_dir),
        max_steps=10,
        save_steps=2,
        save_total_limit=2,
        **settings,
    )
    assert checkpoint_names(output_dir) == ["checkpoint-10", "checkpoint-8"]
    # the uninterrupted run's checkpoint-10 continued to step 20 here gives that run's final weights
    continued = tmp_path / "continued"
    finetune(
        str(TINY),
        DATA,
        str(continued),
        max_steps=20,
        save_steps=5,
        resume=uninterrupted / "checkpoint-10",
        **settings,
    )
    assert_same_weights(continued, uninterrupted)
    model, tokenizer = load_model(str(continued / "checkpoint-20"))
    assert model.chat(tokenizer, IMAGE, "Describe the image.", {"max_new_tokens": 4})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss-reduction", "sample"], "--loss-reduction.*packing is off"),
        (["--max-packed-tokens", "512"], "--max-packed-tokens.*packing is off"),
        (["--packing", "--max-length", "256"], "--max-length.*--max-packed-tokens"),
        (["--packing", "--streaming", "--packing-strategy", "best_fit"], "--packing-strategy.*greedy"),
    ],
)
def test_packing_flags_that_cannot_work_together_are_refused_naming_the_flags_before_the_model_loads(
    flags, message, tmp_path
):
    with pytest.raises(SystemExit, match=message):
        main(["finetune", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()
