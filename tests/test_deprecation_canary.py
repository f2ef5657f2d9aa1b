"""The deprecation canary: navil's main flows (chat, generate, the pipeline, save and load, push_to_hub, processor
loading, fine-tuning) on the installed releases, with every deprecation warning that navil's code triggers in
transformers, torch, TRL or PEFT turned into an error (see deprecation_canary.py). Run on the newest releases, it
catches the next release's breakage one release early. The fine-tuning flows need navil[train] (TRL, PEFT)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deprecation_canary import NaViLDeprecationError, navil_deprecations_as_errors
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "navil-tiny"
EXAMPLE_IMAGE = ROOT / "examples" / "shapes.png"
EXAMPLE = json.loads((ROOT / "examples" / "shapes.json").read_text())
DATA = ROOT / "examples" / "finetune" / "train.jsonl"
MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image", "path": str(EXAMPLE_IMAGE)}, {"type": "text", "text": EXAMPLE["question"]}],
    }
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """navil-tiny saved with this code: the Auto classes run the code files of the folder they load, and those of
    checkpoints/ may be the previous release's."""
    from navil import NaViLForConditionalGeneration, NaViLProcessor

    folder = tmp_path_factory.mktemp("canary") / "navil-tiny"
    NaViLForConditionalGeneration.from_pretrained(TINY).save_pretrained(folder)
    NaViLProcessor.from_pretrained(TINY).save_pretrained(folder)
    return folder


def test_the_canary_turns_a_deprecation_raised_under_navils_code_into_an_error(monkeypatch):
    from transformers import PreTrainedModel
    from transformers.utils.deprecation import deprecate_kwarg

    from navil import NaViLForConditionalGeneration

    # navil's from_pretrained passes output_loading_info=True to transformers': declared deprecated here
    deprecated = deprecate_kwarg("output_loading_info", "99.0.0")(PreTrainedModel.from_pretrained.__func__)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(deprecated))
    with pytest.raises(NaViLDeprecationError, match="output_loading_info"):
        with navil_deprecations_as_errors():
            NaViLForConditionalGeneration.from_pretrained(TINY)
    # a deprecation of transformers that other code than navil's uses is not navil's
    renamed = deprecate_kwarg("old_argument", "99.0.0", new_name="new_argument")(lambda new_argument=None: None)
    with navil_deprecations_as_errors() as canary:
        renamed(old_argument=1)
    assert any("old_argument" in message for message in canary.others)


def test_chat_generate_and_batch_chat_trigger_no_deprecation():
    from transformers import AutoTokenizer

    from navil import NaViLForConditionalGeneration

    with navil_deprecations_as_errors():
        tokenizer = AutoTokenizer.from_pretrained(TINY)
        model = NaViLForConditionalGeneration.from_pretrained(TINY).eval()
        settings = dict(max_new_tokens=16, do_sample=False)
        assert model.chat(tokenizer, str(EXAMPLE_IMAGE), EXAMPLE["question"], settings) == EXAMPLE["answer"]
        replies = model.batch_chat(tokenizer, [EXAMPLE["question"]] * 2, [[str(EXAMPLE_IMAGE)]] * 2, settings)
        assert replies == [EXAMPLE["answer"]] * 2


def test_auto_classes_generate_and_pipeline_trigger_no_deprecation(folder):
    from transformers import AutoModel, AutoProcessor, pipeline

    with navil_deprecations_as_errors():
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        assert processor.decode_reply(output[0, inputs["input_ids"].shape[1] :]) == EXAMPLE["answer"]
        pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
        result = pipe(text=MESSAGES, max_new_tokens=16, return_full_text=False)
        assert result[0]["generated_text"] == EXAMPLE["answer"]


def test_save_load_round_trip_and_push_to_hub_trigger_no_deprecation(tmp_path, local_hub):
    from transformers import AutoModel, AutoProcessor

    from navil import NaViLForConditionalGeneration, NaViLProcessor

    folder = tmp_path / "saved"
    with navil_deprecations_as_errors():
        model = NaViLForConditionalGeneration.from_pretrained(TINY)
        processor = NaViLProcessor.from_pretrained(TINY)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        loaded_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        reply = loaded.chat(loaded_processor.tokenizer, str(EXAMPLE_IMAGE), EXAMPLE["question"])
        loaded.push_to_hub("you/navil-model")
        loaded_processor.push_to_hub("you/navil-model")
    assert reply == EXAMPLE["answer"]
    assert (local_hub / "you" / "navil-model" / "model.safetensors").is_file()


def test_processor_loads_in_a_fresh_process_without_prompt_or_deprecation(folder, tmp_path):
    # a fresh interpreter with stdin closed: a remote-code prompt fails there, and once-per-process log lines show
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
            from transformers import AutoProcessor
            auto = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
            from navil import NaViLProcessor
            direct = NaViLProcessor.from_pretrained({str(folder)!r})
            assert type(direct.image_processor).__name__ == type(auto.image_processor).__name__ == "NaViLImageProcessor"
            print(len(direct.tokenizer), len(auto.tokenizer))
        """)
    )
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("deprecation_canary.py")), str(script)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "trust_remote_code" not in result.stdout + result.stderr
    direct, auto = map(int, result.stdout.split())
    assert direct == auto > 0


def tiny_images_example():
    image = Image.open(EXAMPLE_IMAGE).convert("RGB").resize((64, 64))
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": EXAMPLE["question"]}]},
            {"role": "assistant", "content": EXAMPLE["answer"]},
        ],
        "images": [image],
    }


def test_trainer_with_activation_checkpointing_triggers_no_deprecation(folder, tmp_path):
    from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

    from navil.compat_navil import with_checkpointing_names
    from navil.training import NaViLDataCollator, causal_lm_loss

    with navil_deprecations_as_errors():
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        settings = dict(max_steps=1, remove_unused_columns=False, report_to="none", use_cpu=True)
        args = TrainingArguments(
            str(tmp_path), **with_checkpointing_names({"gradient_checkpointing": True}), **settings
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=[tiny_images_example()] * 2,
            data_collator=NaViLDataCollator(processor),
            compute_loss_func=causal_lm_loss,
        )
        trainer.train()
    assert trainer.state.global_step == 1


def test_navil_finetune_with_lora_and_sft_trainer_trigger_no_deprecation(folder, tmp_path):
    pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModel, AutoProcessor

    from navil.training import NaViLDataCollator, finetune, load_jsonl

    settings = dict(max_steps=1, per_device_train_batch_size=2, gradient_checkpointing=True)
    with navil_deprecations_as_errors():
        finetune(str(folder), DATA, str(tmp_path / "lora"), lora="both", eval_fraction=0, **settings)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        args = trl.SFTConfig(
            str(tmp_path / "sft"),
            max_steps=1,
            remove_unused_columns=False,
            report_to="none",
            use_cpu=True,
            bf16=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(load_jsonl(DATA)[:2]),
            processing_class=processor,
            data_collator=NaViLDataCollator(processor),
        ).train()
