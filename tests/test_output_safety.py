"""`navil finetune` never loses or corrupts an output (navil.training.checkpointing): one test per safeguard, and one per
way a run used to lose its work (a killed run is resumed in test_resume.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT, TINY, finetune_command
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, TrainingArguments

from navil.checks_navil import RUN_STATUS_FILE
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.tools.cli import load_model, main
from navil.training import NaViLDataCollator, causal_lm_loss, checkpointing, finetune, load_jsonl
from navil.training.checkpointing import LOCK_FILE, NaViLTrainer, NonFiniteError, OutputFolderError, RunLock

IMAGE = str(DATA.parent / "shapes_0.png")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# the flags of every `navil finetune` here besides its --max-steps: 2 examples a step, nothing held out
SHORT_RUN = ["--batch-size", "2", "--eval-fraction", "0", "--no-multiscale", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_tiny(output_dir, data=DATA, model_dir=TINY, **overrides):
    """`navil.training.finetune` of the embedded model for 2 steps of 2 examples, nothing held out."""
    settings = dict(max_steps=2, per_device_train_batch_size=2, eval_fraction=0, multiscale=False)
    settings.update(learning_rate=5e-4, disable_tqdm=True, use_cpu=True, seed=0)
    return finetune(str(model_dir), data, str(output_dir), **{**settings, **overrides})


def navil_finetune(output_dir, *flags):
    command = finetune_command(output_dir, "--max-steps", "2", *SHORT_RUN, *flags)
    return subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, cwd="/")


def saved_files(folder):
    return sorted(path.relative_to(folder).as_posix() for path in Path(folder).rglob("*") if path.is_file())


def assert_every_saved_weight_is_finite(folder):
    for path in Path(folder).rglob("*.safetensors"):
        for name, tensor in load_file(path).items():
            assert tensor.isfinite().all(), f"{path}: {name}"


def trainer_arguments(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=5, per_device_train_batch_size=2, report_to="none")
    settings.update(remove_unused_columns=False, use_cpu=True, disable_tqdm=True, save_strategy="no")
    return {**settings, **overrides}


# -- What to build 4: the safeguards ---------------------------------------------------------------------------------


def test_an_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes through any permission bits: use a file system that takes no new folders
        output_dir = Path("/sys/navil-output")
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        output_dir = read_only / "run"
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(OutputFolderError, match="is not writable"):
        finetune_tiny(output_dir)


def test_too_little_free_space_is_refused_before_step_1_with_the_space_needed(tmp_path, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=5 * 2**20))
    with pytest.raises(OutputFolderError, match=r"has 5\.0 MiB free, but this run writes about") as error:
        finetune_tiny(tmp_path / "run", save_steps=1, save_total_limit=2)
    assert "--save-total-limit" in str(error.value)
    assert saved_files(tmp_path / "run") == [RUN_STATUS_FILE]  # no step ran, nothing was saved
    # the estimate counts the final model and the checkpoints kept at once (one more while the newest is written)
    model = AutoModel.from_pretrained(TINY, trust_remote_code=True)
    weights = sum(parameter.numel() * 4 for parameter in model.parameters())
    assert checkpointing.needed_space(model, 0) == int(1.1 * weights)
    assert checkpointing.needed_space(model, 3) == int(1.1 * (weights + 3 * 3 * weights))


def test_a_folder_holding_files_is_refused_unless_overwrite_which_empties_it_first(tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(TINY, output_dir)
    (output_dir / "model-00002-of-00002.safetensors").write_bytes(b"an old run's shard")
    with pytest.raises(OutputFolderError, match="already holds .* files or folders.*--overwrite"):
        finetune_tiny(output_dir)
    assert load_file(output_dir / "model.safetensors").keys() == load_file(TINY / "model.safetensors").keys()
    finetune_tiny(output_dir, overwrite=True)
    assert not (output_dir / "model-00002-of-00002.safetensors").exists()
    assert not (output_dir / "training_history.json").exists()  # the old run's file went with it
    NaViLForConditionalGeneration.from_pretrained(output_dir)


def test_overwrite_never_deletes_the_model_or_the_data_the_run_reads(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(TINY, model_dir)
    with pytest.raises(OutputFolderError, match="would delete .*which this run reads"):
        finetune_tiny(model_dir, model_dir=model_dir, overwrite=True)
    with pytest.raises(OutputFolderError, match="which this run reads"):
        finetune_tiny(ROOT / "examples", overwrite=True)
    assert saved_files(model_dir) == saved_files(TINY) and (ROOT / "examples" / "finetune" / "train.jsonl").is_file()


HOLD_THE_LOCK = """
import sys, time
from navil.training.checkpointing import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_two_runs_into_one_folder_cannot_both_succeed_and_a_killed_runs_lock_is_taken_over(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True, env=ONE_THREAD
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            finetune_tiny(output_dir)
        with pytest.raises(OutputFolderError, match="in use"):
            RunLock(output_dir).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (output_dir / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind by the killed run
    finetune_tiny(output_dir)
    assert not (output_dir / LOCK_FILE).exists()
    NaViLForConditionalGeneration.from_pretrained(output_dir)


def test_a_folder_whose_save_is_unfinished_is_refused_by_every_navil_loader(tmp_path, capsys):
    folder = tmp_path / "unfinished"
    shutil.copytree(TINY, folder)
    NaViLForConditionalGeneration.from_pretrained(folder)
    (folder / RUN_STATUS_FILE).write_text(json.dumps({"complete": False}))
    with pytest.raises(ValueError, match="unfinished save .*--resume"):
        NaViLForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ValueError, match="unfinished save"):
        load_model(str(folder))
    with pytest.raises(ValueError, match="unfinished save"):
        main(["chat", "--model", str(folder), "--image", IMAGE, "Describe it."])
    (folder / RUN_STATUS_FILE).write_text(json.dumps({"complete": True, "step": 2}))
    load_model(str(folder))


def test_the_final_folder_is_marked_unfinished_until_the_whole_model_is_in_place(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"

    write_status = checkpointing.write_status

    def dies_before_marking_complete(folder, complete, **details):
        if complete and Path(folder) == output_dir:
            raise KeyboardInterrupt
        write_status(folder, complete, **details)

    monkeypatch.setattr(checkpointing, "write_status", dies_before_marking_complete)
    with pytest.raises(KeyboardInterrupt):
        finetune_tiny(output_dir)
    monkeypatch.undo()
    assert json.loads((output_dir / RUN_STATUS_FILE).read_text()) == {"complete": False}
    with pytest.raises(ValueError, match="unfinished save"):
        load_model(str(output_dir))
    with pytest.raises(OutputFolderError, match="already holds"):  # it may hold a whole model: never deleted unasked
        finetune_tiny(output_dir)
    finetune_tiny(output_dir, overwrite=True)
    assert json.loads((output_dir / RUN_STATUS_FILE).read_text()) == {"complete": True, "step": 2}
    load_model(str(output_dir))


def test_a_resume_that_finds_no_checkpoint_leaves_the_finished_folder_complete_and_loadable(tmp_path):
    finetune_tiny(tmp_path / "run")
    with pytest.raises(ValueError, match="--resume found no complete checkpoint-N folder"):
        finetune_tiny(tmp_path / "run", resume=True)
    assert json.loads((tmp_path / "run" / RUN_STATUS_FILE).read_text())["complete"] is True
    load_model(str(tmp_path / "run"))


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_no_nan_weight_is_saved(tmp_path):
    # a learning rate of 1e10 blows the weights up at step 1's update; step 2's loss is NaN
    with pytest.raises(NonFiniteError, match="The loss of step 2 is nan"):
        finetune_tiny(tmp_path / "run", max_steps=4, save_steps=1, learning_rate=1e10)
    assert [path.name for path in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert_every_saved_weight_is_finite(tmp_path / "run")


def test_a_weight_made_non_finite_by_a_step_is_never_saved(tmp_path):
    # through the Python API (no learning-rate check): an infinite learning rate makes step 1's update infinite
    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    args = TrainingArguments(
        **trainer_arguments(tmp_path, learning_rate=float("inf"), save_strategy="steps", save_steps=1)
    )
    trainer = NaViLTrainer(
        model=AutoModel.from_pretrained(TINY, trust_remote_code=True),
        args=args,
        train_dataset=load_jsonl(DATA),
        processing_class=processor,
        data_collator=NaViLDataCollator(processor, multiscale=False),
        compute_loss_func=causal_lm_loss,
    )
    with pytest.raises(
        NonFiniteError, match="After step 1 the weight .* holds NaN or infinite values, so it is not saved"
    ):
        trainer.train()
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_non_finite_gradient_stops_the_run_naming_the_parameter_and_the_step(tmp_path):
    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    model = AutoModel.from_pretrained(TINY, trust_remote_code=True)
    calls = []

    def infinite_at_step_3(gradient):
        calls.append(1)
        return gradient * float("inf") if len(calls) == 3 else gradient

    model.mlp1[0].weight.register_hook(infinite_at_step_3)
    args = TrainingArguments(**trainer_arguments(tmp_path, max_grad_norm=0))
    trainer = NaViLTrainer(
        model=model,
        args=args,
        train_dataset=load_jsonl(DATA),
        processing_class=processor,
        data_collator=NaViLDataCollator(processor, multiscale=False),
        compute_loss_func=causal_lm_loss,
    )
    with pytest.raises(NonFiniteError, match=r"The gradient of mlp1\.0\.weight at step 3"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_loss_6_lora_on_a_torchao_int8_model_is_refused_before_the_first_step_not_at_save(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    quantized = tmp_path / "int8"
    model = NaViLForConditionalGeneration.from_pretrained(
        TINY, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    model.save_pretrained(quantized)
    AutoProcessor.from_pretrained(TINY, trust_remote_code=True).save_pretrained(quantized)
    with pytest.raises(ValueError, match="LoRA on a torchao model cannot be saved"):
        finetune_tiny(tmp_path / "lora", model_dir=quantized, lora="both")
    with pytest.raises(ValueError, match="torchao-quantized integers"):
        finetune_tiny(tmp_path / "full", model_dir=quantized)
    assert saved_files(tmp_path / "lora") == [RUN_STATUS_FILE]


@pytest.mark.parametrize(
    "settings, problem",
    [
        (dict(learning_rate=float("inf")), "learning_rate must be a positive finite number"),
        (dict(save_total_limit=2), "save_total_limit keeps the newest checkpoints, which only save_steps writes"),
        (dict(overwrite=True, resume=True), "--overwrite deletes the run that --resume continues"),
        (dict(resume=True), "--resume found no complete checkpoint-N folder"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_the_first_step(tmp_path, settings, problem):
    with pytest.raises(ValueError, match=problem):
        finetune_tiny(tmp_path / "run", **settings)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# -- The seven ways a run lost its work ----------------------------------------------------------------------------


def test_loss_1_a_bad_example_met_at_step_9_is_left_out_before_step_1_and_the_run_saves_its_model(tmp_path, caplog):
    examples = load_jsonl(DATA)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    bad = {**examples[0], "images": [str(tmp_path / "broken.png")]}
    collator = NaViLDataCollator(AutoProcessor.from_pretrained(TINY, trust_remote_code=True), multiscale=False)
    with pytest.raises(ValueError, match="Cannot read .* as an image"):  # what the collator would meet at step 9
        collator([bad])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in [*examples[:16], bad, *examples[16:]]))
    with pytest.warns(UserWarning, match="Left out 1 of 24 training examples"):
        trainer = finetune_tiny(tmp_path / "run", data=data, max_steps=12, save_steps=6)
    assert "example 16" in caplog.text and "undecodable image" in caplog.text
    assert trainer.state.global_step == 12 and len(trainer.train_dataset) == 23
    assert (tmp_path / "run" / "checkpoint-12").is_dir()
    NaViLForConditionalGeneration.from_pretrained(tmp_path / "run")


def test_loss_2_a_read_only_or_full_output_folder_is_found_before_training_not_after(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(NaViLTrainer, "train", lambda self, **kwargs: trained.append(1))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OutputFolderError, match="0.0 MiB free"):
        finetune_tiny(tmp_path / "full")
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputFolderError, match="not writable"):
        finetune_tiny(tmp_path / "a-file" / "run")
    assert not trained


def test_loss_3_learning_rate_inf_fails_and_saves_no_nan(tmp_path):
    result = navil_finetune(tmp_path / "run", "--learning-rate", "inf")
    assert result.returncode != 0
    assert "learning_rate must be a positive finite number, got inf" in result.stderr
    assert not list((tmp_path / "run").rglob("*.safetensors"))


def test_loss_4_of_two_runs_started_into_one_folder_only_one_succeeds(tmp_path):
    output_dir = tmp_path / "run"
    runs = [
        subprocess.Popen(
            finetune_command(output_dir, "--max-steps", "3", *SHORT_RUN),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ONE_THREAD,
            cwd="/",
        )
        for _ in range(2)
    ]
    results = [(run.wait(), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    assert sorted(code for code, _ in results) == [0, 1], [error[-2000:] for _, error in results]
    refusal = next(error for code, error in results if code)
    assert "in use by another training run" in refusal or "already holds" in refusal
    NaViLForConditionalGeneration.from_pretrained(output_dir)


def test_loss_5_a_rerun_into_an_old_folder_never_mixes_its_files_with_the_old_runs(tmp_path):
    output_dir = tmp_path / "run"
    finetune_tiny(output_dir, save_steps=2)
    (output_dir / "model-00001-of-00002.safetensors").write_bytes(b"an older shard")
    first = load_file(output_dir / "model.safetensors")
    with pytest.raises(OutputFolderError, match="already holds"):
        finetune_tiny(output_dir, learning_rate=1e-3)
    assert all(
        torch.equal(tensor, load_file(output_dir / "model.safetensors")[name]) for name, tensor in first.items()
    )
    finetune_tiny(output_dir, learning_rate=1e-3, overwrite=True)
    assert not (output_dir / "model-00001-of-00002.safetensors").exists()
    second = load_file(output_dir / "model.safetensors")
    assert any(not torch.equal(tensor, second[name]) for name, tensor in first.items())


def test_loss_7_checkpoints_saved_through_the_python_api_hold_tokenizer_and_processor_and_chat(tmp_path, capsys):
    finetune_tiny(tmp_path / "run", save_steps=1)
    checkpoint = tmp_path / "run" / "checkpoint-1"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert (checkpoint / name).is_file(), name
    assert main(["chat", "--model", str(checkpoint), "--image", IMAGE, "--max-new-tokens", "6", "Describe it."]) == 0
    assert capsys.readouterr().out.strip()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") is not None
