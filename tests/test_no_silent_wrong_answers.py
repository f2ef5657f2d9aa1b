"""Reliability, round three (issue 33, items 8-21): no silently wrong answer, and a clear error naming the problem,
the file or the flag instead of a raw exception. One test (or one parametrized group) per item."""

import copy
import errno
import json
import shutil

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file, save_file

from navil import configuration_navil
from navil.configuration_navil import END_OF_TURN_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, NaViLConfig
from navil.modeling_navil import NaViLForConditionalGeneration

GENERATION = dict(max_new_tokens=2, do_sample=False)


@pytest.fixture
def golden_copy(tmp_path):
    """A writable copy of the golden Qwen3-VE checkpoint."""
    folder = tmp_path / "qwen3_ve"
    shutil.copytree(GOLDEN / "qwen3_ve", folder)
    return folder


# -- 8. integer tensors for float parameters ------------------------------------------------------------------------


def test_integer_tensors_for_float_parameters_are_refused_at_load(golden_copy):
    weights = load_file(golden_copy / "model.safetensors")
    name = next(key for key in weights if key.endswith("q_proj.weight"))
    weights[name] = weights[name].view(torch.int32)  # the same bytes relabelled I32
    save_file(weights, golden_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"stores {name} as I32, but the model's parameters are floating point"):
        NaViLForConditionalGeneration.from_pretrained(golden_copy)


def test_one_missing_visual_expert_tensor_is_named_not_called_a_dense_checkpoint(golden_copy):
    weights = load_file(golden_copy / "model.safetensors")
    name = next(key for key in weights if "mlp_ve." in key)
    del weights[name]
    save_file(weights, golden_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"does not match NaViLForConditionalGeneration \\(missing_keys: {name}\\)"):
        NaViLForConditionalGeneration.from_pretrained(golden_copy)


def test_a_weight_of_the_wrong_rank_is_named_as_mismatched_not_blamed_on_the_config(golden_copy):
    weights = load_file(golden_copy / "model.safetensors")
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"  # a tensor whose rows give vision_config.intermediate_size
    weights[name] = torch.zeros(weights[name].numel() + 1)
    save_file(weights, golden_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"does not match NaViLForConditionalGeneration \\(mismatched_keys: {name}"):
        NaViLForConditionalGeneration.from_pretrained(golden_copy)


# -- 9. finite, sane float config fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("text_config", "rope_theta", 1e-300),
        ("text_config", "rope_theta", 1.0),
        ("text_config", "rope_factor", float("nan")),
        ("text_config", "rope_factor", float("inf")),
        ("text_config", "rms_norm_eps", 5.0),
        ("vision_config", "layer_norm_eps", 1e10),
    ],
)
def test_float_config_fields_must_be_finite_and_in_range(section, field, value):
    config = json.loads((GOLDEN / "qwen3_ve" / "config.json").read_text())
    config["llm_config" if section == "text_config" else section][field] = value
    with pytest.raises(ValueError, match=f"{field}"):
        NaViLConfig(**config)


# -- 10. special-token ids cross-checked against the tokenizer ------------------------------------------------------


@pytest.mark.parametrize("swap", [(END_OF_TURN_TOKEN, IMG_CONTEXT_TOKEN), (IMG_START_TOKEN, IMG_END_TOKEN)])
def test_special_token_ids_that_disagree_with_the_tokenizer_are_refused_by_chat(golden_tokenizer, swap):
    model = NaViLForConditionalGeneration.from_pretrained(GOLDEN / "qwen3_ve").eval()
    model.init_special_token_ids(golden_tokenizer)
    ids = model.config.special_token_ids
    first, second = swap
    ids[first], ids[second] = ids[second], ids[first]
    with pytest.raises(ValueError, match=f"special_token_ids disagree with the tokenizer: .*{first} is {ids[first]}"):
        model.chat(golden_tokenizer, None, "Hi", GENERATION)


def test_a_model_folder_whose_special_token_ids_disagree_with_the_tokenizer_is_refused(tmp_path, golden_tokenizer):
    from navil.checks_navil import check_saved_special_token_ids  # what NaViLProcessor.from_pretrained runs

    config = json.loads((GOLDEN / "qwen3_ve" / "config.json").read_text())
    config["special_token_ids"] = {
        token: golden_tokenizer.convert_tokens_to_ids(token) for token in (IMG_START_TOKEN, IMG_END_TOKEN)
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_saved_special_token_ids(tmp_path, golden_tokenizer)
    ids = config["special_token_ids"]
    ids[IMG_START_TOKEN], ids[IMG_END_TOKEN] = ids[IMG_END_TOKEN], ids[IMG_START_TOKEN]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"disagree with the tokenizer: {IMG_START_TOKEN} is {ids[IMG_START_TOKEN]}"):
        check_saved_special_token_ids(tmp_path, golden_tokenizer)


def test_a_processor_built_in_memory_refuses_special_token_ids_that_disagree_with_the_tokenizer(
    model, golden_tokenizer
):
    from navil.processing_navil import NaViLProcessor

    config = copy.deepcopy(model.config)
    NaViLProcessor.from_model_config(config, golden_tokenizer)
    ids = config.special_token_ids
    ids[IMG_START_TOKEN], ids[IMG_END_TOKEN] = ids[IMG_END_TOKEN], ids[IMG_START_TOKEN]
    with pytest.raises(
        ValueError, match=f"disagree with the tokenizer: .*{IMG_START_TOKEN} is {ids[IMG_START_TOKEN]}"
    ):
        NaViLProcessor.from_model_config(config, golden_tokenizer)


BREAK_TOKENS = (configuration_navil.IMG_LINE_BREAK_TOKEN, configuration_navil.IMG_FRAME_BREAK_TOKEN)


@pytest.mark.parametrize("swap", [(IMG_START_TOKEN, IMG_END_TOKEN), BREAK_TOKENS])
def test_the_pipeline_refuses_an_in_memory_model_whose_special_token_ids_disagree_with_the_tokenizer(
    golden_tokenizer, swap
):
    from PIL import Image
    from transformers import pipeline

    model = NaViLForConditionalGeneration.from_pretrained(GOLDEN / "qwen3_ve").eval()
    model.init_special_token_ids(golden_tokenizer)
    pipe = pipeline("image-text-to-text", model=model, processor=model.chat_processor(golden_tokenizer))
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    pipe(text=messages, max_new_tokens=2)  # the ids the processor was built with answer
    ids = model.config.special_token_ids
    first, second = swap
    ids[first], ids[second] = ids[second], ids[first]
    with pytest.raises(ValueError, match="image tokens do not follow config.special_token_ids: .* disagree with the"):
        pipe(text=messages, max_new_tokens=2)


# -- 11. image tokens without images --------------------------------------------------------------------------------


def test_image_tokens_without_pixel_values_are_refused(model, processor):
    prompt = processor.build_prompt("What is this?") + IMG_CONTEXT_TOKEN * 64
    inputs = processor(text=prompt, return_tensors="pt")
    with pytest.raises(ValueError, match=f"has 64 {IMG_CONTEXT_TOKEN} tokens but no pixel_values"):
        model.generate(**inputs, **GENERATION)


# -- 13. generation settings of chat --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=float("inf"), do_sample=True), "'temperature'\\] must be a positive finite number"),
        (dict(top_p=float("nan"), do_sample=True), "'top_p'\\] must be a number in \\(0, 1\\]"),
        (dict(top_p=2.0, do_sample=True), "'top_p'\\] must be a number in \\(0, 1\\]"),
        (dict(eos_token_id=-5), "'eos_token_id'\\] must be a token id in \\[0, "),
        (dict(pad_token_id=[1]), "'pad_token_id'\\] must be a token id in \\[0, \\d+\\), got \\[1\\]"),
        (dict(num_beams=0), "'num_beams'\\] must be a whole number >= 1"),
        (dict(num_beams=2, length_penalty=1200), "'length_penalty'\\] must be a number in \\[-50, 50\\]"),
        (dict(return_dict_in_generate=True), "sets return_dict_in_generate, which chat sets itself"),
        (dict(streamer=None), "streamer: pass it as chat's streamer argument"),
        (dict(input_ids=torch.zeros(1, 2, dtype=torch.long)), "sets input_ids, which chat sets itself"),
        (dict(pixel_values=torch.zeros(4, 768)), "pixel_values: pass the images as chat's pixel_values"),
        (dict(max_new_tokens=0), "max_new_tokens=0 asks for no reply"),
        (dict(max_length=3, max_new_tokens=None), "max_length=3 leaves no room for a reply after the prompt's"),
    ],
    ids=["temperature-inf", "top_p-nan", "top_p-2", "eos-negative", "pad-list", "beams-0", "overflow", "return-dict"]
    + ["streamer", "ids", "pv", "no-new-tokens", "max-length-in-prompt"],
)
def test_chat_generation_settings_are_validated(model, golden_tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        model.chat(golden_tokenizer, None, "Hi", dict(GENERATION, **settings))


def test_chat_takes_whole_numbers_for_float_generation_settings(model, golden_tokenizer):
    settings = dict(GENERATION, do_sample=True, temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(model.chat(golden_tokenizer, None, "Hi", settings), str)


# -- 21. save_pretrained onto a full disk ---------------------------------------------------------------------------


def test_save_pretrained_on_a_full_disk_raises_oserror_and_leaves_the_folder_as_it_was(model, tmp_path, monkeypatch):
    import transformers.modeling_utils

    target = tmp_path / "saved"
    target.mkdir()
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (target / "notes.txt").write_text("kept")
    before = sorted(path.name for path in target.iterdir())
    with monkeypatch.context() as patch:

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        patch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
        with pytest.raises(OSError, match=f"Could not save the model to {target} .*No space left on device"):
            model.save_pretrained(target)
        with pytest.raises(OSError, match="nothing was written there"):
            model.save_pretrained(tmp_path / "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["saved"]  # no temporary folder, no config alone
    assert sorted(path.name for path in target.iterdir()) == before
    model.save_pretrained(target)  # with room on the disk: the earlier save's shards go, other files stay
    assert not (target / "model-00001-of-00002.safetensors").exists() and (target / "notes.txt").is_file()
    reloaded = NaViLForConditionalGeneration.from_pretrained(target)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


# -- 12. image-processor flags and value ranges ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(load_truncated_images="false"), "load_truncated_images must be True or False, got 'false'"),
        (dict(apply_exif_orientation="no"), "apply_exif_orientation must be True or False, got 'no'"),
        (dict(do_normalize=None), "do_normalize must be True or False, got None"),
        (dict(do_rescale=1), "do_rescale must be True or False, got 1"),
        (dict(image_mean=[9, 9, 9]), "image_mean must lie in \\[0, 1\\] and image_std in \\(0, 1\\]"),
        (dict(image_std=0), "image_mean must lie in \\[0, 1\\] and image_std in \\(0, 1\\]"),
        (dict(image_mean=float("nan")), "image_mean needs one finite number or three"),
        (dict(rescale_factor=float("inf")), "rescale_factor must be a finite non-zero number"),
        (dict(resample="bicubic"), "resample must be one of PIL's resampling filters \\(0 = NEAREST"),
        (dict(resample=99), "resample must be one of PIL's resampling filters .*, got 99"),
    ],
)
def test_image_processor_flags_and_ranges_are_checked_in_files_and_calls(tmp_path, options, message):
    from navil.image_processing_navil import NaViLImageProcessor

    with pytest.raises(ValueError, match=message):
        NaViLImageProcessor(**options)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(dict(NaViLImageProcessor().to_dict(), **options), default=float)
    )
    with pytest.raises(ValueError, match=message):
        NaViLImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(do_normalize="false"), "do_normalize must be True or False, got 'false'"),
        (dict(do_rescale="no"), "do_rescale must be True or False, got 'no'"),
        (dict(image_mean=[9, 9, 9]), "image_mean must lie in \\[0, 1\\] and image_std in \\(0, 1\\]"),
        (dict(rescale_factor=float("nan")), "rescale_factor must be a finite non-zero number"),
    ],
)
def test_image_processor_flags_and_ranges_are_checked_per_call(options, message):
    from navil.image_processing_navil import NaViLImageProcessor

    with pytest.raises(ValueError, match=message):
        NaViLImageProcessor()(torch.zeros(16, 16, 3, dtype=torch.uint8), **options)


# -- 15. flags that give a meaningless result -----------------------------------------------------------------------


def test_freeze_refuses_a_bool_stage(model):
    from navil.training import freeze

    with pytest.raises(ValueError, match="Unknown training stage True"):
        freeze(copy.deepcopy(model), True)


def test_apply_chat_template_refuses_a_message_without_content(processor):
    with pytest.raises(ValueError, match="message 0 has content None; it needs a string or a list"):
        processor.apply_chat_template([{"role": "user", "content": None}], add_generation_prompt=True)


# -- 16. loading problems name the folder and the file --------------------------------------------------------------


def test_a_missing_model_folder_is_named(tmp_path):
    from navil.processing_navil import load_navil_tokenizer

    missing = tmp_path / "no" / "such" / "dir"
    for load in (load_navil_tokenizer, NaViLForConditionalGeneration.from_pretrained):
        with pytest.raises(OSError, match=f"The model folder {missing} does not exist"):
            load(str(missing))


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_navil_commands_name_a_missing_model_folder(tmp_path, command):
    from navil.tools.cli import main

    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(OSError, match=f"The model folder {missing} does not exist"):
        main([command, "--model", str(missing), *(["Hi"] if command == "chat" else [])])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "tokenizer.json").unlink(), "has no tokenizer files \\(one of tokenizer.json"),
        (lambda folder: (folder / "tokenizer.json").write_text(""), "tokenizer.json is not valid JSON"),
        (lambda folder: (folder / "tokenizer_config.json").write_text('{"model_max'), "tokenizer_config.json is not"),
    ],
    ids=["no-tokenizer-files", "empty-tokenizer-json", "truncated-tokenizer-config"],
)
def test_broken_tokenizer_files_are_named(tmp_path, damage, message):
    from navil.processing_navil import load_navil_tokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(GOLDEN / "tokenizer", folder)
    damage(folder)
    with pytest.raises((OSError, ValueError), match=message):
        load_navil_tokenizer(folder)


# -- 18. config fields -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda config: config.update(dtype="bogus"), "NaViLConfig.dtype must be a floating-point dtype"),
        (lambda config: config.update(torch_dtype="int8"), "NaViLConfig.torch_dtype must be a floating-point dtype"),
        (lambda config: config["llm_config"].update(backbone="internlm2"), "text_config.backbone is 'internlm2'"),
    ],
    ids=["dtype-bogus", "dtype-int8", "backbone"],
)
def test_config_fields_get_a_clear_error(change, message):
    config = json.loads((GOLDEN / "qwen3_ve" / "config.json").read_text())
    change(config)
    with pytest.raises(ValueError, match=message):
        NaViLConfig(**config)


def test_a_redundant_backbone_key_is_accepted():
    config = json.loads((GOLDEN / "qwen3_ve" / "config.json").read_text())
    config["llm_config"]["backbone"] = "qwen3"
    assert NaViLConfig(**config).text_config.backbone == "qwen3"


def test_preprocessor_patch_size_must_be_a_whole_number(tmp_path):
    from navil.image_processing_navil import NaViLImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(dict(NaViLImageProcessor().to_dict(), patch_size="16"))
    )
    with pytest.raises(
        ValueError, match="patch_size must be a positive whole number or None \\(no limit\\), got '16'"
    ):
        NaViLImageProcessor.from_pretrained(tmp_path)


# -- 10 (fine-tuning) and 15. fine-tuning settings that would train silently wrong ---------------------------------


def test_finetune_refuses_special_token_ids_that_disagree_with_the_tokenizer(model, golden_tokenizer):
    from navil.training.collators import check_finetune_setup

    config = copy.deepcopy(model.config)
    config.special_token_ids[END_OF_TURN_TOKEN] += 1
    with pytest.raises(ValueError, match=f"{END_OF_TURN_TOKEN} is {config.special_token_ids[END_OF_TURN_TOKEN]} in"):
        check_finetune_setup(config, golden_tokenizer, 2, None)


@pytest.mark.parametrize("stage", [1, "vision_frozen"])
def test_finetune_refuses_a_stage_with_lora(model, golden_tokenizer, stage):
    from navil.training.collators import check_finetune_setup

    check_finetune_setup(model.config, golden_tokenizer, 2, "text")  # the default stage is fine
    with pytest.raises(ValueError, match=f"stage={stage!r} has no effect with lora='text'"):
        check_finetune_setup(model.config, golden_tokenizer, stage, "text")


# -- 14 and 17. JSONL files: images resolved alike, encodings, lines, nesting, fields -------------------------------


def write_jsonl(folder, lines, encoding="utf-8"):
    path = folder / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes("\n".join(lines).encode(encoding))
    return path


def chat_line(text="What is it?", **fields):
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "A circle."}]
    return json.dumps({"messages": messages, **fields}, ensure_ascii=False)


def test_jsonl_image_blocks_resolve_against_the_file_like_images(tmp_path, monkeypatch):
    from navil.training.finetune import load_jsonl

    monkeypatch.chdir(tmp_path)
    lines = [
        chat_line([{"type": "image"}, {"type": "text", "text": "Hi"}], images=["x.png"]),
        chat_line([{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi"}]),
    ]
    path = write_jsonl(tmp_path, lines)
    first, second = load_jsonl(path)
    assert first["images"] == [str(path.parent / "x.png")]
    assert second["messages"][0]["content"][0]["image"] == str(path.parent / "x.png")


def test_jsonl_splits_lines_on_newlines_only(tmp_path):
    from navil.training.finetune import load_jsonl

    path = write_jsonl(tmp_path, [chat_line("a\u2028b\u0085c\u000cd")])
    assert load_jsonl(path)[0]["messages"][0]["content"] == "a\u2028b\u0085c\u000cd"


@pytest.mark.parametrize(
    "lines, encoding, message",
    [
        ([chat_line("caf\u00e9")], "latin-1", "train.jsonl:1 is not UTF-8 \\(byte 0xe9\\)"),
        ([chat_line()], "utf-16", "train.jsonl looks like UTF-16"),
        ([chat_line(), "[" * 100000 + "]" * 100000], "utf-8", "train.jsonl:2 is nested too deeply"),
        ([chat_line(images=5)], "utf-8", "train.jsonl:1: 'images' must be a list of images .*got int 5"),
        ([chat_line(images="a.png")], "utf-8", "train.jsonl:1: 'images' must be a list of images .*got str 'a.png'"),
        ([chat_line(), chat_line(images=[None])], "utf-8", "train.jsonl:2: 'images' entry 0 is null"),
        ([chat_line("Hi \\ud800")], "utf-8", "train.jsonl:1: message 0 is not valid Unicode: .*lone surrogate"),
    ],
    ids=["latin-1", "utf-16", "deep-nesting", "images-int", "images-string", "images-null", "lone-surrogate"],
)
def test_jsonl_problems_name_the_file_and_line(tmp_path, lines, encoding, message):
    from navil.training.finetune import load_jsonl

    path = write_jsonl(tmp_path, [line.replace("\\\\ud800", "\\ud800") for line in lines], encoding)
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_collator_refuses_bad_examples_and_an_empty_batch(processor):
    from navil.training.finetune import NaViLDataCollator

    collator = NaViLDataCollator(processor)
    with pytest.raises(ValueError, match="'images' must be a list of images"):
        collator([json.loads(chat_line(images=5))])
    with pytest.raises(ValueError, match="'images' must be a list of images"):
        collator([json.loads(chat_line("<image>", images="a.png"))])
    with pytest.raises(ValueError, match="message 0 is not valid Unicode"):
        collator([json.loads(chat_line("Hi \ud800"))])
    with pytest.raises(ValueError, match="The collator got an empty batch"):
        NaViLDataCollator(processor, max_length=64)([])


# -- 15 and 20. command-line flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--num-questions", "0"], "argument --num-questions: must be a whole number >= 1, got '0'"),
        (["eval", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got '0'"),
        (["chat", "--device", "meta", "Hi"], "argument --device: meta holds no values"),
        (["finetune", "--data", "x", "--output-dir", "y", "--epochs", "nan"], "argument --epochs: must be a positive"),
        (
            ["finetune", "--data", "x", "--output-dir", "y", "--eval-fraction", "1"],
            "argument --eval-fraction: must be",
        ),
    ],
)
def test_meaningless_cli_flags_get_a_flag_level_error(capsys, argv, message):
    from navil.tools.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_flag_level_error(capsys):
    from navil.tools.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--device", "cuda", "Hi"])
    assert "argument --device: cuda is not available (this machine has no CUDA GPU)" in capsys.readouterr().err


def test_eval_fraction_that_leaves_nothing_to_train_is_refused():
    from navil.training.finetune import split_examples

    assert split_examples([{}, {}], 0.5) == ([{}], [{}])
    with pytest.raises(ValueError, match="eval_fraction=0.99 holds out 2 of the 2 examples, leaving none to train"):
        split_examples([{}, {}], 0.99)


def test_serve_without_vllm_names_the_extra(monkeypatch):
    import importlib.util

    from navil.tools.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"pip install navil\[vllm\]"):
        main(["serve"])


# -- 19. torchao ----------------------------------------------------------------------------------------------------


def torchao_int4(group_size: int):
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)))


def test_torchao_group_size_that_does_not_divide_a_layer_is_refused_naming_it():
    with pytest.raises(ValueError, match="group size 48 cannot quantize vision_model.*: its \\d+ input features"):
        NaViLForConditionalGeneration.from_pretrained(GOLDEN / "qwen3_ve", quantization_config=torchao_int4(48))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_torchao_int4_weight_only_config_without_a_gpu_names_the_cpu_alternative():
    pytest.importorskip("torchao")
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    with pytest.raises(ValueError, match="Int4WeightOnlyConfig has no CPU kernels .* IntxWeightOnlyConfig"):
        NaViLForConditionalGeneration.from_pretrained(
            GOLDEN / "qwen3_ve", quantization_config=TorchAoConfig(Int4WeightOnlyConfig())
        )


def test_torchao_checkpoint_reloaded_in_another_dtype_is_refused(tmp_path):
    quantized = NaViLForConditionalGeneration.from_pretrained(
        GOLDEN / "qwen3_ve", quantization_config=torchao_int4(32)
    )
    quantized.save_pretrained(tmp_path / "int4")
    with pytest.raises(ValueError, match="is a torchao checkpoint quantized in torch.float32.* dtype=torch.float32"):
        NaViLForConditionalGeneration.from_pretrained(tmp_path / "int4", dtype=torch.bfloat16)
    NaViLForConditionalGeneration.from_pretrained(tmp_path / "int4", dtype=torch.float32)  # its own dtype loads


def lora_with_random_updates(model):
    """`model` wrapped by PEFT with LoRA on every text and visual expert, its adapters initialised to non-zero
    updates (PEFT's default makes them zero, which merging could not lose)."""
    from peft import LoraConfig, get_peft_model

    from navil.training.finetune import lora_target_modules

    torch.manual_seed(0)
    target = lora_target_modules(model.config, "both")
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target, init_lora_weights=False))


def test_merging_lora_into_torchao_weights_is_refused_naming_the_adapter():
    pytest.importorskip("peft")
    quantized = NaViLForConditionalGeneration.from_pretrained(
        GOLDEN / "qwen3_ve", quantization_config=torchao_int4(32)
    ).eval()
    prompt = torch.tensor([[1, 5, 9, 200, 17, 33]])
    with torch.no_grad():
        base = quantized(input_ids=prompt).logits
        adapted = lora_with_random_updates(quantized)
        with_adapters = adapted(input_ids=prompt).logits
        with pytest.raises(ValueError, match="adapter self_attn.q_proj of language-model layer 0 wraps a torchao"):
            adapted.merge_and_unload()
        assert torch.equal(adapted(input_ids=prompt).logits, with_adapters)  # nothing was merged
        unloaded = adapted.unload()  # dropping the adapters (no merge) still works
        assert not any(hasattr(module, "lora_A") for module in unloaded.modules())
        assert torch.equal(unloaded(input_ids=prompt).logits, base)


def test_merging_lora_into_full_precision_weights_still_works(model):
    pytest.importorskip("peft")
    prompt = torch.tensor([[1, 5, 9, 200, 17, 33]])
    with torch.no_grad():
        adapted = lora_with_random_updates(copy.deepcopy(model))
        with_adapters = adapted(input_ids=prompt).logits
        merged = adapted.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=prompt).logits, with_adapters, atol=1e-4, rtol=1e-4)
