"""The paper's stages as config files (configs/stages, navil.training.stage_configs): each documents the paper's
hyper-parameters or says it does not state them, `navil finetune --config` reads them under the flags given, the
smoke config trains on CPU in seconds, and the configs ship in the wheel."""

import ast
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from navil.tools.cli import build_parser
from navil.training.stage_configs import STAGE_CONFIG_DIR, load_stage_config, with_stage_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "finetune" / "train.jsonl"
PAPER_STAGES = {"stage1": "1", "stage1_2": "1.2", "stage2": "2"}
# The flags of a config whose values the paper states, and the entry of `stated_in_the_paper` that states each.
PAPER_FLAGS = {
    "learning_rate": "peak_learning_rate",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "max_steps": "training_steps",
    "max_image_patches": "max_image_patches",
}


@pytest.mark.parametrize("name, stage", PAPER_STAGES.items())
def test_each_paper_stage_config_gives_the_papers_values_and_parses_as_finetune_flags(name, stage):
    content = json.loads((STAGE_CONFIG_DIR / f"{name}.json").read_text())
    paper, settings = content["paper"], content["finetune"]
    stated = paper["stated_in_the_paper"]
    assert "2510.08565" in paper["source"] and stated["trainable_parameters"] and content["description"]
    assert sorted(paper["from_the_paper"] + paper["navil_choices"]) == sorted(settings)
    for flag, entry in PAPER_FLAGS.items():
        assert flag in paper["from_the_paper"] and settings[flag] == stated[entry], flag
    schedule = {"constant with warm-up": "constant_with_warmup", "cosine decay": "cosine"}[stated["lr_schedule"]]
    assert settings["lr_scheduler"] == schedule and settings["adam_beta2"] == 0.95 and settings["bf16"]
    assert stated["optimizer"].startswith("AdamW") and stated["gradient_accumulation"] == 1
    assert stated["visual_multiscale_packing"] and not settings.get("no_multiscale")
    args = build_parser().parse_args(
        with_stage_config(["finetune", "--config", name, "--data", "d", "--output-dir", "o"])
    )
    assert args.stage == stage
    for flag, value in load_stage_config(name).items():
        assert getattr(args, flag) == value, flag


def test_sft_names_the_papers_stage_two():
    assert load_stage_config("sft") == load_stage_config("stage2")


def test_flags_given_on_the_command_line_override_the_config_and_unknown_keys_are_refused(tmp_path):
    argv = ["finetune", "--data", "d", "--output-dir", "o", "--config", "stage1", "--learning-rate", "3e-3"]
    args = build_parser().parse_args(with_stage_config(argv))
    assert args.learning_rate == 3e-3 and args.stage == "1" and args.streaming and args.max_steps == 70000
    assert with_stage_config(["finetune", "--data", "d"]) == ["finetune", "--data", "d"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"finetune": {"learning_speed": 1e-4}}))
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            with_stage_config(["finetune", f"--config={bad}", "--data", "d", "--output-dir", "o"])
        )
    bad.write_text(json.dumps({"learning_rate": 1e-4}))
    with pytest.raises(ValueError, match="no 'finetune' object"):
        load_stage_config(bad)
    with pytest.raises(FileNotFoundError, match="sft, smoke, stage1, stage1_2, stage2"):
        load_stage_config("stage3")


def test_the_smoke_config_trains_on_cpu_with_the_flags_over_it_and_saves_a_loadable_model(tmp_path):
    command = [sys.executable, "-m", "navil.tools.cli", "finetune", "--config", "smoke", "--data", str(DATA)]
    command += ["--output-dir", str(tmp_path), "--max-steps", "3"]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 3  # --max-steps 3 over the config's 2
    # the config's warm-up over 2 steps to its 5e-4 (not the flag's default 1e-4), then constant
    assert [step["learning_rate"] for step in steps] == pytest.approx([0.0, 2.5e-4, 5e-4])
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_the_stage_configs_ship_in_the_wheel():
    setup = ast.parse((ROOT / "setup.py").read_text())
    package_data = next(
        ast.literal_eval(keyword.value)
        for node in ast.walk(setup)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "package_data"
    )
    files = [path.relative_to(ROOT).as_posix() for path in (ROOT / "configs").rglob("*") if path.is_file()]
    assert files and all(any(fnmatch.fnmatch(file, pattern) for pattern in package_data["navil"]) for file in files)


def test_the_multinode_accelerate_config_is_fsdp2_wrapping_the_models_blocks_and_saving_loadable_weights():
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import AutoModel

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp2_multinode.yaml"))
    assert config.distributed_type == "FSDP" and config.num_machines == 2 and config.num_processes == 16
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # every checkpoint loads with AutoModel
    # TRANSFORMER_BASED_WRAP without a class list wraps the model's _no_split_modules: one unit per block
    model = AutoModel.from_pretrained(ROOT / "checkpoints" / "navil-tiny", trust_remote_code=True)
    wrapped = [module for module in model.modules() if type(module).__name__ in model._no_split_modules]
    assert len(wrapped) == model.config.vision_config.num_hidden_layers + model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("backbone", ["internlm2", "qwen3"])
def test_stage_1_2_trains_the_text_attention_blocks_on_top_of_stage_1(backbone):
    from navil import NaViLForConditionalGeneration
    from navil.layouts_navil import layout_of_backbone
    from navil.testing.configs import tiny_config
    from navil.training import freeze
    from navil.training.upcycling import is_visual_expert

    model = NaViLForConditionalGeneration(tiny_config(backbone))
    stage_1 = {name for name, parameter in freeze(model, 1).named_parameters() if parameter.requires_grad}
    stage_1_2 = {name for name, parameter in freeze(model, "1.2").named_parameters() if parameter.requires_grad}
    attention = f".{layout_of_backbone(backbone).attention}."
    added = stage_1_2 - stage_1
    assert stage_1 < stage_1_2 and added
    assert all(attention in name and not is_visual_expert(name) for name in added)
    text_attention = {name for name, _ in model.named_parameters() if attention in name and not is_visual_expert(name)}
    assert added == text_attention - {name for name in text_attention if name.startswith("vision_model.")}
    assert not any(".mlp." in name or "feed_forward" in name or "embed" in name for name in added)


def test_max_image_patches_limits_the_training_images_and_leaves_the_saved_processor_alone():
    from PIL import Image

    from navil.tools.loading import load_navil_processor
    from navil.training.finetune import with_max_image_patches

    processor = load_navil_processor(str(ROOT / "checkpoints" / "navil-tiny"), False)
    limited = with_max_image_patches(processor, 200)
    image = Image.new("RGB", (800, 600))
    full = processor.image_processor(image, multiscale=False, return_tensors="pt")["image_grid_thw"]
    small = limited.image_processor(image, multiscale=False, return_tensors="pt")["image_grid_thw"]
    direct = processor.image_processor(image, multiscale=False, max_pixels=200 * 16**2, return_tensors="pt")
    assert small.tolist() == direct["image_grid_thw"].tolist() and small.prod() < full.prod()
    assert limited.tokenizer is processor.tokenizer
    assert processor.image_processor.max_pixels == 102400  # unchanged: checkpoints keep the model's limit
    with pytest.raises(ValueError, match="max_image_patches=10 is below .* 144 patches"):
        with_max_image_patches(processor, 10)
