"""Packed training batches (navil.training.packing): whole examples in a token budget, each computed exactly as alone."""

import importlib.util
import json
import logging
import math

import pytest
import torch
from conftest import ROOT, TINY, trainer_arguments
from transformers import AutoProcessor, Trainer, TrainingArguments

import navil.compat_navil as compat
from navil.compat_navil import with_checkpointing_names
from navil.configuration_navil import IMG_END_TOKEN, IMG_START_TOKEN
from navil.layouts_navil import LAYOUTS
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.training import NaViLDataCollator, tiny_config, train_loop
from navil.training.packing import (
    LOSS_REDUCTIONS,
    PackedDataset,
    PackedIterableDataset,
    PackingCollator,
    packed_batches,
    packed_loss,
    packed_loss_fn,
    packing_trainer_class,
    plan_packs,
    split_model_inputs,
    token_losses,
)
from navil.training.synthetic_data import ShapesDataset

BACKBONES = tuple(layout.backbone for layout in LAYOUTS.values())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY, trust_remote_code=True)


@pytest.fixture(scope="module")
def examples():
    """Six chats: four images of different sizes (multi-scale), two text-only, answers of different lengths."""
    data = ShapesDataset(seed=5, size_range=((40, 80), (160, 330)))
    chats = []
    for index, (image, words) in enumerate([(True, 1), (False, 6), (True, 9), (True, 2), (False, 1), (True, 4)]):
        sample = data.caption(index)
        user = [{"type": "image"}] * image + [{"type": "text", "text": "Describe" + " it" * words}]
        chats.append(
            {
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": sample.answer}],
                "images": [sample.image] * image,
            }
        )
    return chats


@pytest.fixture(scope="module")
def encode(processor):
    return NaViLDataCollator(processor, multiscale=True).encode


def tiny_model(processor, backbone, **text):
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(tiny_config(backbone, vocab_size=len(processor.tokenizer), text=text))
    model.init_special_token_ids(processor.tokenizer)
    return model.float()


def packed_batch(processor, encode, examples, loss_reduction="token"):
    pack = [PackedDataset(examples, encode, 10**6)[0]]
    return PackingCollator(processor, loss_reduction)(pack)


def spans(batch):
    """The token slice of each example of a packed row."""
    owner = batch["example_index"][0]
    return [slice(int(i[0]), int(i[-1]) + 1) for i in (torch.nonzero(owner == e).flatten() for e in owner.unique())]


def alone(processor, example):
    """An example's batch as the plain (unpacked) collator builds it."""
    batch = NaViLDataCollator(processor, multiscale=True)([example])
    return batch.pop("labels"), batch


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("loss_reduction", LOSS_REDUCTIONS)
def test_packed_loss_and_every_gradient_equal_the_per_example_computation_with_the_same_reduction(
    processor, encode, examples, backbone, loss_reduction
):
    model = tiny_model(processor, backbone)
    inputs, packing = split_model_inputs(packed_batch(processor, encode, examples, loss_reduction))
    assert inputs["input_ids"].shape[0] == 1 and "attention_mask" not in inputs
    loss, _ = packed_loss(model(**inputs).logits, packing)
    loss.backward()
    packed_gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()

    sums, counts = [], []
    for example in examples:
        labels, batch = alone(processor, example)
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        targets = targets.masked_fill(batch["input_ids"] == model.special_token_id("<IMG_CONTEXT>"), -100)
        sums.append(token_losses(model(**batch).logits, targets).sum())
        counts.append(int((targets != -100).sum()))
    sums, counts = torch.stack(sums), torch.tensor(counts, dtype=torch.float32)
    weights = {"token": torch.ones_like(counts), "sample": 1 / counts, "square": counts.rsqrt()}[loss_reduction]
    expected = (sums * weights).sum() / (counts * weights).sum()
    expected.backward()

    assert torch.allclose(loss, expected, atol=1e-5, rtol=0)
    for name, parameter in model.named_parameters():
        assert torch.allclose(packed_gradients[name], parameter.grad, atol=1e-5, rtol=0), name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_changing_a_token_or_a_pixel_of_one_example_changes_no_logit_of_another(processor, encode, examples, backbone):
    model = tiny_model(processor, backbone).eval()
    batch = packed_batch(processor, encode, examples)
    inputs, _ = split_model_inputs(batch)
    example_spans = spans(batch)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        # a text token of example 1 (text-only), then a pixel of example 2's image (the second image)
        token = dict(inputs, input_ids=inputs["input_ids"].clone())
        token["input_ids"][0, example_spans[1].start + 3] += 1
        pixel = dict(inputs, pixel_values=inputs["pixel_values"].clone())
        first_image_patches = int(encode(examples[0])[2][0]["pixel_values"].shape[0])
        pixel["pixel_values"][first_image_patches + 5] += 1.0
        for changed, example in ((token, 1), (pixel, 2)):
            changed_logits = model(**changed).logits[0]
            for other, span in enumerate(example_spans):
                assert torch.equal(changed_logits[span], logits[span]) == (other != example), (example, other)


def test_position_ids_restart_per_example_and_no_image_block_is_split(processor, encode, examples):
    batch = packed_batch(processor, encode, examples)
    tokenizer = processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(token) for token in (IMG_START_TOKEN, IMG_END_TOKEN))
    example_spans = spans(batch)
    assert len(example_spans) == len(examples)
    for example, span in zip(examples, example_spans):
        ids = batch["input_ids"][0, span]
        assert torch.equal(batch["position_ids"][0, span], torch.arange(ids.shape[0]))
        assert ids.tolist() == encode(example)[0]
        opened = torch.cumsum((ids == start).long() - (ids == end).long(), 0)
        assert opened.min() >= 0 and opened[-1] == 0  # every <img> … </img> block inside its example
        assert int((ids == start).sum()) >= len(example["images"])


def test_padding_to_a_multiple_adds_one_padding_segment_that_changes_no_logit_and_no_loss(processor, encode, examples):
    model = tiny_model(processor, "internlm2").eval()
    pack = [PackedDataset(examples, encode, 10**6)[0]]
    plain, padded = (
        PackingCollator(processor, "sample", pad_to_multiple_of=multiple)(pack) for multiple in (None, 64)
    )
    length = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] - length < 64
    assert torch.equal(padded["position_ids"][0, length:], torch.arange(padded["input_ids"].shape[1] - length))
    assert (padded["example_index"][0, length:] == -1).all() and (padded["shift_labels"][0, length:] == -100).all()
    with torch.no_grad():
        (plain_inputs, plain_packing), (padded_inputs, padded_packing) = map(split_model_inputs, (plain, padded))
        plain_logits, padded_logits = model(**plain_inputs).logits, model(**padded_inputs).logits
        assert torch.equal(padded_logits[:, :length], plain_logits)
        assert packed_loss(padded_logits, padded_packing)[0] == packed_loss(plain_logits, plain_packing)[0]


def test_greedy_and_best_fit_keep_every_example_once_within_the_budget():
    lengths = torch.randint(1, 50, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy, best_fit = (plan_packs(lengths, 60, strategy) for strategy in ("greedy", "best_fit"))
    for packs in (greedy, best_fit):
        assert sorted(index for pack in packs for index in pack) == list(range(200))
        assert max(sum(lengths[index] for index in pack) for pack in packs) <= 60
    assert [index for pack in greedy for index in pack] == list(range(200))  # greedy keeps the order
    assert len(best_fit) < len(greedy)
    assert len(best_fit) <= math.ceil(sum(lengths) / 60) + 2

    streamed = list(PackedIterableDataset(lengths, lambda n: ([0] * n, [0] * n, []), 60, "best_fit", buffer_size=8))
    assert sorted(len(example.input_ids) for pack in streamed for example in pack) == sorted(lengths)
    assert max(sum(len(example.input_ids) for example in pack) for pack in streamed) <= 60
    assert len(streamed) < len(greedy)
    # every data-loader worker packs its own share of a plain iterable: each example once in all
    loader = torch.utils.data.DataLoader(
        PackedIterableDataset(lengths, lambda n: ([0] * n, [0] * n, []), 60), batch_size=None, num_workers=2
    )
    assert sorted(len(example.input_ids) for pack in loader for example in pack) == sorted(lengths)


def test_an_example_longer_than_the_budget_is_an_error_naming_it_or_skipped_with_a_logged_warning(caplog):
    def encode(n):
        return [0] * n, [0] * n, []

    with pytest.raises(ValueError, match=r"Example 2 has 90 tokens, more than max_packed_tokens=60.*too_long='skip'"):
        PackedDataset([10, 20, 90, 30], encode, 60)
    with pytest.raises(ValueError, match="position 1 of the stream has 90 tokens"):
        list(PackedIterableDataset([10, 90], encode, 60))
    with caplog.at_level(logging.WARNING, logger="navil.training.packing"):
        dataset = PackedDataset([10, 20, 90, 30], encode, 60, too_long="skip")
    assert dataset.num_skipped == 1 and "Example 2 has 90 tokens" in caplog.text
    assert [[len(example.input_ids) for example in dataset[i]] for i in range(len(dataset))] == [[10, 20, 30]]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_navil_per_example_masks_equal_transformers_packed_masks_and_per_example_sdpa(
    processor, encode, examples, backbone, monkeypatch
):
    """The transformers 4.51 path (navil's own per-example masks) gives the logits of transformers 5's packed-sequence
    masks and of sdpa run on each example alone, with sliding windows too."""
    text = {"use_sliding_window": True, "sliding_window": 40, "max_window_layers": 1} if backbone == "qwen3" else {}
    model = tiny_model(processor, backbone, **text).eval()
    inputs, _ = split_model_inputs(packed_batch(processor, encode, examples))
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
        transformers_masks = model(**inputs).logits
        monkeypatch.setattr(compat, "MASKS_DETECT_PACKED_SEQUENCES", False)
        navil_masks = model(**inputs).logits
        monkeypatch.setattr(compat, "create_causal_mask", None)
        without_masking_utils = model(**inputs).logits
    assert compat.create_causal_mask is None or torch.allclose(transformers_masks, sdpa, atol=1e-5, rtol=0)
    assert torch.allclose(navil_masks, sdpa, atol=1e-5, rtol=0)
    assert torch.equal(without_masking_utils, navil_masks)


def test_flash_attention_receives_the_boundaries_of_the_packed_examples(processor, encode, examples, monkeypatch):
    """Under flash attention the decoder hands transformers' varlen kernel the examples' boundaries; a reference
    varlen function (what `flash_attn_varlen_func` computes, on the CPU) then gives the logits of sdpa."""
    import navil.modeling_navil as modeling

    boundaries = []

    def varlen_reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # query [1, heads, seq, d]; key/value [1, kv_heads, seq, d] -> [1, seq, heads, d]
        assert attention_mask is None and torch.equal(kwargs["cu_seq_lens_k"], kwargs["cu_seq_lens_q"])
        key, value = (states.repeat_interleave(module.num_key_value_groups, 1) for states in (key, value))
        bounds = kwargs["cu_seq_lens_q"].tolist()
        boundaries.append((bounds, kwargs["max_length_q"]))
        output = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling
                )
                for start, end in zip(bounds, bounds[1:])
            ],
            dim=2,
        )
        return output.transpose(1, 2), None

    interface = modeling.attention_interface
    monkeypatch.setattr(
        modeling,
        "attention_interface",
        lambda name: varlen_reference if name == "flash_attention_2" else interface(name),
    )
    model = tiny_model(processor, "qwen3").eval()
    batch = packed_batch(processor, encode, examples)
    inputs, _ = split_model_inputs(batch)
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.language_model.config._attn_implementation = "flash_attention_2"
        flash = model(**inputs).logits
    example_spans = spans(batch)
    expected = [span.start for span in example_spans] + [example_spans[-1].stop]
    assert boundaries[0] == (expected, max(span.stop - span.start for span in example_spans))
    assert len(boundaries) == model.config.text_config.num_hidden_layers
    assert torch.allclose(flash, sdpa, atol=1e-5, rtol=0)


def test_packing_trainer_normalises_over_the_accumulated_batch_and_logs_tokens_padding_and_loss_per_modality(
    processor, encode, examples, tmp_path
):
    dataset = PackedDataset(examples, encode, 400, strategy="best_fit")
    collator = PackingCollator(processor, "sample")
    settings = trainer_arguments(tmp_path, max_steps=2, per_device_train_batch_size=1, learning_rate=1e-3)
    args = TrainingArguments(
        **with_checkpointing_names({"gradient_checkpointing": True}),
        **settings,
        gradient_accumulation_steps=len(dataset),
    )
    model = tiny_model(processor, "qwen3")
    # the gradient of one accumulated step is the gradient of the whole batch's loss, computed in one piece
    whole_inputs, whole_packing = split_model_inputs(collator([dataset[i] for i in range(len(dataset))]))
    packed_loss(model(**whole_inputs).logits, whole_packing)[0].backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    trainer = packing_trainer_class(Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collator)
    batches, total = trainer.get_batch_samples(iter([collator([dataset[i]]) for i in range(len(dataset))]), 9, None)
    assert torch.allclose(total, whole_packing["loss_weights"].sum())
    for batch in batches:
        trainer.compute_loss(model, batch).backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], atol=1e-6, rtol=0), name
    model.zero_grad()

    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert math.isfinite(trainer.evaluate(dataset)["eval_loss"])
    for entry in logs:
        assert entry["tokens_per_s"] > 0 and entry["padding_share"] == 0
        assert math.isfinite(entry["loss_image"]) and math.isfinite(entry["loss_text"])


def test_sft_trainer_trains_on_packed_batches(processor, encode, examples, tmp_path):
    trl = pytest.importorskip("trl")
    dataset = PackedDataset(examples, encode, 400)
    args = trl.SFTConfig(
        **trainer_arguments(tmp_path, max_steps=2, per_device_train_batch_size=1),
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = packing_trainer_class(trl.SFTTrainer)(
        model=tiny_model(processor, "internlm2"),
        args=args,
        train_dataset=dataset.as_index_dataset(),  # SFTTrainer takes `datasets` datasets only
        processing_class=processor,
        data_collator=PackingCollator(processor, "square", packs=dataset),
    )
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_train_bench_smoke_run_prints_the_json_keys_and_packing_removes_the_padding(capsys):
    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "benchmarks" / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--json", "--examples", "4", "--max-side", "256", "--budget", "2048"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = ("padding_share_padded", "padding_share_packed", "real_tokens_per_s_padded", "real_tokens_per_s_packed")
    for key in (*keys, "flops_per_s_share_of_gemm_peak"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["padding_share_packed"] < result["padding_share_padded"]
    assert 0 < result["flops_per_s_share_of_gemm_peak"] < 1


def test_the_recipe_loop_trains_on_packed_batches(processor, encode, examples):
    model = tiny_model(processor, "qwen3")
    batches = packed_batches(PackedDataset(examples, encode, 400), PackingCollator(processor, "square"))
    losses = train_loop(model, batches, 12, 3e-3, loss_fn=packed_loss_fn, progress=False)
    assert sum(losses[-3:]) < sum(losses[:3])


# One packed training run, for a single process and for two under `accelerate launch` (gloo on the CPU).
PACKED_RUN = """
import json, sys
import torch
from transformers import AutoProcessor, Trainer, TrainingArguments
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.training import NaViLDataCollator, tiny_config
from navil.training.packing import PackedDataset, PackingCollator, packing_trainer_class
from navil.training.synthetic_data import ShapesDataset

output_dir, batch_size = sys.argv[1], int(sys.argv[2])
processor = AutoProcessor.from_pretrained(sys.argv[3], trust_remote_code=True)
data = ShapesDataset(seed=7, size_range=((40, 80), (160, 330)))
examples = []
for index in range(16):
    sample = data.caption(index)
    image = index % 3 != 1
    user = [{"type": "image"}] * image + [{"type": "text", "text": "Describe" + " it" * (index % 5)}]
    examples.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": sample.answer}],
                     "images": [sample.image] * image})
encode = NaViLDataCollator(processor, multiscale=True).encode
dataset = PackedDataset(examples, encode, 300)
torch.manual_seed(0)
model = NaViLForConditionalGeneration(tiny_config("qwen3", vocab_size=len(processor.tokenizer)))
model.init_special_token_ids(processor.tokenizer)
args = TrainingArguments(output_dir=output_dir, max_steps=4, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=2, learning_rate=2e-3, logging_steps=1, report_to="none",
                         save_strategy="no", remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True,
                         dataloader_drop_last=True)
trainer = packing_trainer_class(Trainer)(model=model, args=args, train_dataset=dataset,
                                         data_collator=PackingCollator(processor, "sample"))
trainer.train()
if trainer.is_world_process_zero():
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    json.dump(losses, open(output_dir + "/losses.json", "w"))
"""


@pytest.mark.multiprocess
def test_two_process_packed_training_follows_the_single_process_loss_curve_of_the_same_global_batch(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "packed_run.py"
    script.write_text(PACKED_RUN)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    curves = []
    for name, launcher, batch_size in (("single", [sys.executable], 2), ("ddp", accelerate, 1)):
        output_dir = tmp_path / name
        output_dir.mkdir()
        command = [*launcher, str(script), str(output_dir), str(batch_size), str(TINY)]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        curves.append(json.loads((output_dir / "losses.json").read_text()))
    assert len(curves[0]) == len(curves[1]) == 4
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=0, atol=1e-4)
