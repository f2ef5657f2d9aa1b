"""What a new user meets first: the Hub model card, `navil serve`'s CPU defaults, a prompt rendered with a bare image
block, `navil --help` without the quantization libraries, and the wheel's files."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "navil-tiny"
EXAMPLE_IMAGE = ROOT / "examples" / "shapes.png"
EXAMPLE = json.loads((ROOT / "examples" / "shapes.json").read_text())
GIB = 1 << 30


def run_snippet(snippet: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs `snippet` with this interpreter in `cwd`, offline and without stdin."""
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# -- the model card -------------------------------------------------------------------------------------------------


def card_snippet(card: str) -> str:
    return card.split("```python\n")[1].split("```")[0]


def test_push_to_hub_uploads_a_card_naming_the_repo_whose_snippet_runs_as_written(local_hub):
    from navil import NaViLForConditionalGeneration, NaViLProcessor

    NaViLForConditionalGeneration.from_pretrained(TINY).push_to_hub("you/navil-model")
    NaViLProcessor.from_pretrained(TINY).push_to_hub("you/navil-model")  # after the model: keeps the repo's name
    card = (local_hub / "you" / "navil-model" / "README.md").read_text()
    assert "\n# you/navil-model\n" in card and 'path = "you/navil-model"' in card
    assert "tmp" not in card
    # from the folder holding the hub, "you/navil-model" is the pushed repo
    assert run_snippet(card_snippet(card), local_hub).stdout.strip() == EXAMPLE["answer"]


def test_a_processor_pushed_first_then_the_model_leave_the_card_naming_the_repo(local_hub):
    from navil import NaViLForConditionalGeneration, NaViLProcessor

    NaViLProcessor.from_pretrained(TINY).push_to_hub("you/other")
    NaViLForConditionalGeneration.from_pretrained(TINY).push_to_hub("you/other")
    card = (local_hub / "you" / "other" / "README.md").read_text()
    assert "\n# you/other\n" in card and 'path = "you/other"' in card


def test_a_card_of_the_users_own_on_the_hub_is_kept(local_hub):
    from navil import NaViLForConditionalGeneration

    (local_hub / "you" / "own").mkdir(parents=True)
    (local_hub / "you" / "own" / "README.md").write_text("# My model\n\nMy words.\n")
    NaViLForConditionalGeneration.from_pretrained(TINY).push_to_hub("you/own")
    # (the Hub's card object adds empty metadata when transformers saves it)
    assert (local_hub / "you" / "own" / "README.md").read_text().endswith("\n# My model\n\nMy words.\n")


def test_the_base_model_of_a_converted_folder_is_named_in_its_card_and_survives_saving_and_pushing(
    tmp_path, local_hub
):
    from navil import NaViLForConditionalGeneration
    from navil.configuration_navil import hub_repo_id_of, write_model_card

    snapshot = tmp_path / "models--OpenGVLab--NaViL-2B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_repo_id_of(snapshot) == "OpenGVLab/NaViL-2B"  # a folder of the Hub cache
    assert hub_repo_id_of("OpenGVLab/NaViL-2B") == "OpenGVLab/NaViL-2B"
    assert hub_repo_id_of(TINY) is None  # a local folder that names no repo
    # what navil convert and navil finetune do after saving
    folder = tmp_path / "converted"
    NaViLForConditionalGeneration.from_pretrained(TINY).save_pretrained(folder)
    write_model_card(folder, base_model="OpenGVLab/NaViL-2B")
    assert "\nbase_model: OpenGVLab/NaViL-2B\n" in (folder / "README.md").read_text()
    # loaded from that folder, saved elsewhere and pushed: the base model is still known
    model = NaViLForConditionalGeneration.from_pretrained(folder)
    model.save_pretrained(tmp_path / "again")
    assert "\nbase_model: OpenGVLab/NaViL-2B\n" in (tmp_path / "again" / "README.md").read_text()
    model.push_to_hub("you/converted")
    card = (local_hub / "you" / "converted" / "README.md").read_text()
    assert "\nbase_model: OpenGVLab/NaViL-2B\n" in card and "\n# you/converted\n" in card


# -- navil serve's CPU defaults ---------------------------------------------------------------------------------------


def test_navil_serve_on_a_24_gb_laptop_bounds_the_kv_cache_and_runs_eager():
    from navil.tools.cli import serve_defaults

    arguments, reasons = serve_defaults(["--dtype", "float32"], on_cpu=True, available_memory=11 * GIB, env={})
    assert arguments == ["--kv-cache-memory-bytes", str(11 * GIB // 4 // (GIB // 4) * (GIB // 4)), "--enforce-eager"]
    assert len(reasons) == 2 and "2.75 GiB" in reasons[0] and "eager" in reasons[1]
    # a large machine gets 4 GiB, a nearly full one a quarter of what is free (at least 256 MiB)
    assert serve_defaults([], True, 200 * GIB, {})[0][:2] == ["--kv-cache-memory-bytes", str(4 * GIB)]
    assert serve_defaults([], True, GIB // 2, {})[0][:2] == ["--kv-cache-memory-bytes", str(GIB // 4)]


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        (["--kv-cache-memory-bytes", "1000000000"], {}, ["--enforce-eager"]),
        (["--gpu_memory_utilization=0.5"], {}, ["--enforce-eager"]),
        ([], {"VLLM_CPU_KVCACHE_SPACE": "2"}, ["--enforce-eager"]),
        (["--kv-cache-memory-bytes=1000000000", "--no-enforce-eager"], {}, []),
        (["--kv-cache-memory-bytes", "1000000000", "-O3"], {}, []),
        (["--kv-cache-memory-bytes", "1000000000", "--compilation-config", "{}"], {}, []),
    ],
    ids=["kv-bytes", "memory-fraction", "env-kv-space", "no-eager", "optimization-level", "compilation-config"],
)
def test_navil_serve_leaves_what_the_user_chose(flags, env, expected):
    from navil.tools.cli import serve_defaults

    assert serve_defaults(flags, on_cpu=True, available_memory=11 * GIB, env=env)[0] == expected


def test_navil_serve_adds_nothing_on_gpus():
    from navil.tools.cli import serve_defaults

    assert serve_defaults([], on_cpu=False, available_memory=11 * GIB, env={}) == ([], [])


# -- a prompt rendered from a bare image block, then processor(images=..., text=prompt) -----------------------------


def test_a_bare_image_block_renders_the_placeholder_and_processor_images_text_answers_as_chat():
    from PIL import Image
    from transformers import AutoTokenizer

    from navil import NaViLForConditionalGeneration, NaViLProcessor

    processor = NaViLProcessor.from_pretrained(TINY)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": EXAMPLE["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == processor.build_prompt(EXAMPLE["question"], num_images=1)
    image = Image.open(EXAMPLE_IMAGE)
    inputs = processor(images=image, text=prompt)
    model = NaViLForConditionalGeneration.from_pretrained(TINY).eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = processor.decode_reply(output[0, inputs["input_ids"].shape[1] :])
    assert reply == model.chat(AutoTokenizer.from_pretrained(TINY), image, EXAMPLE["question"]) == EXAMPLE["answer"]
    # tokenized straight from the messages, the image must be in the block (else <image> would stay text)
    with pytest.raises(ValueError, match="render the prompt with tokenize=False"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


# -- what `navil --help` imports -------------------------------------------------------------------------------------


def test_navil_help_imports_no_model_classes_nor_quantization_libraries():
    # transformers' model classes import every installed quantization library (torchao prints lines at import)
    code = (
        "import sys\nfrom navil.tools.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(name for name in ('torchao', 'transformers.modeling_utils') if name in sys.modules))"
    )
    result = run_snippet(code, ROOT.parent)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "torchao" not in result.stderr


# -- the wheel -------------------------------------------------------------------------------------------------------


def test_the_wheel_holds_the_fine_tuning_example(tmp_path):
    # a copy without checkpoints/ and .git keeps the build to seconds; the example data is what is checked
    import shutil

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "checkpoints", "tests", "*.egg-info", "build"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("navil-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    example = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "examples" / "finetune").iterdir())
    assert example and {f"navil/{name}" for name in example} <= names
