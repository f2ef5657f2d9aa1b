"""Fine-tuning NaViL with the ecosystem's tools (navil.training.finetune): the chat-data collator, the freezing stages,
LoRA, `transformers.Trainer`, TRL's `SFTTrainer`, `navil finetune` and multi-process training with `accelerate`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA, TINY, finetune_command, trainer_arguments
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

from navil.compat_navil import with_checkpointing_names
from navil.configuration_navil import END_OF_TURN_TOKEN
from navil.training import NaViLDataCollator, causal_lm_loss, check_launch, freeze, load_jsonl, lora_target_modules
from navil.training.synthetic_data import ShapesDataset

QUESTION = "Describe the image."
# torch's default thread count oversubscribes small CPUs shared with other jobs (each step then takes seconds)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY, trust_remote_code=True)


def tiny_model():
    return AutoModel.from_pretrained(TINY, trust_remote_code=True)


def message(role, text, images=0):
    return {"role": role, "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def two_turn_two_image_example():
    data = ShapesDataset(seed=3, size_range=(64, 96))
    first, second = data.caption(0), data.caption(1)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        message("user", "Describe both images.", 2),
        message("assistant", f"{first.answer}; {second.answer}"),
        message("user", "And the first one?"),
        {"role": "assistant", "content": first.answer},
    ]
    return {"messages": messages, "images": [first.image, second.image]}


def label_spans(labels):
    """(start, end) of every run of labelled positions."""
    spans, start = [], None
    for position, label in enumerate([*labels.tolist(), -100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            spans.append((start, position))
            start = None
    return spans


def test_collator_labels_only_the_assistant_turns_of_a_two_turn_two_image_conversation(processor):
    example = two_turn_two_image_example()
    short = {"messages": [message("user", "Hi?"), message("assistant", "yes")]}
    batch = NaViLDataCollator(processor)([example, short])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    answers = [example["messages"][2]["content"][0]["text"], example["messages"][4]["content"]]
    spans = label_spans(labels)
    tokenizer = processor.tokenizer
    assert [tokenizer.decode(ids[start:end]) for start, end in spans] == [a + END_OF_TURN_TOKEN for a in answers]
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    # the prompt of each answer is exactly the one chat() builds (the processor of the model's chat helpers)
    chat_processor = tiny_model().chat_processor(tokenizer)
    system = example["messages"][0]["content"]
    first_prompt = chat_processor.build_prompt("Describe both images.", num_images=2, system_message=system)
    expected = chat_processor(text=first_prompt, images=example["images"], return_tensors="pt")
    assert torch.equal(ids[: spans[0][0]], expected["input_ids"][0])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    history = [("<image>\n<image>\nDescribe both images.", answers[0])]
    second_prompt = chat_processor.build_prompt("And the first one?", history=history, system_message=system)
    expanded = chat_processor.expand_image_placeholders(second_prompt, batch["image_grid_thw"], batch["num_scales"])
    assert tokenizer.decode(ids[: spans[1][0]]) == expanded
    # ... which is what the processor's chat template renders
    messages = [dict(item) for item in example["messages"]]
    messages[1] = {"role": "user", "content": [{"type": "image", "image": image} for image in example["images"]]}
    messages[1]["content"].append({"type": "text", "text": "Describe both images."})
    rendered = processor.apply_chat_template(messages, tokenize=False)
    grids = (batch["image_grid_thw"], batch["num_scales"])
    assert tokenizer.decode(ids[: spans[1][1]]) == processor.expand_image_placeholders(rendered, *grids)
    # the shorter example is right-padded with labels -100 and attention 0
    length = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, length:] == -100).all() and (batch["attention_mask"][1, length:] == 0).all()
    assert tokenizer.decode(batch["input_ids"][1, batch["labels"][1] != -100]) == "yes" + END_OF_TURN_TOKEN


def test_collator_cuts_after_the_images_and_drops_with_a_counted_warning_what_would_cut_an_image(processor):
    example = two_turn_two_image_example()
    collator = NaViLDataCollator(processor, multiscale=False)
    ids, _, _ = collator.encode(example)
    image_end = max(i for i, token in enumerate(ids) if token == collator.image_end_id)
    cut = NaViLDataCollator(processor, max_length=image_end + 3, multiscale=False)([example])
    assert cut["input_ids"].shape == (1, image_end + 3)
    assert torch.equal(cut["input_ids"][0], torch.tensor(ids[: image_end + 3]))
    text_only = {"messages": [message("user", "Hi?"), message("assistant", "yes")]}
    dropping = NaViLDataCollator(processor, max_length=image_end, multiscale=False)
    with pytest.warns(UserWarning, match=r"cut through an image \(1 dropped so far\)"):
        batch = dropping([example, text_only])
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    with pytest.warns(UserWarning, match=r"\(2 dropped so far\)"), pytest.raises(ValueError, match="Every example"):
        dropping([example])
    assert dropping.num_dropped == 2


@pytest.mark.parametrize(
    "example, problem",
    [
        ({"messages": [message("assistant", "yes")]}, "user and assistant messages in turn"),
        ({"messages": [message("user", "a", 1), message("assistant", "b")], "images": []}, "more image blocks"),
        ({"messages": [message("user", "a"), message("assistant", "b")], "images": ["x.png"]}, "1 images under"),
        ({"messages": [message("user", "a"), message("user", "b")]}, "should be a assistant message"),
        ({"messages": [message("user", "a"), message("assistant", "b", 1)], "images": ["x.png"]}, "only user"),
        ({"text": "a"}, "list under 'messages'"),
    ],
)
def test_collator_names_the_problem_of_a_malformed_example(processor, example, problem):
    with pytest.raises(ValueError, match=problem):
        NaViLDataCollator(processor)([example])


def trained_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_loss_decreased(losses):
    assert len(losses) == 20
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def chat_reply(model, processor):
    with torch.inference_mode():
        return model.eval().chat(
            processor.tokenizer, str(DATA.parent / "shapes_0.png"), QUESTION, {"max_new_tokens": 12}
        )


def assert_chats_the_same_in_a_fresh_process(folder, model, processor):
    script = (
        "import sys\nfrom transformers import AutoModel, AutoProcessor\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        f"print(repr(model.chat(processor.tokenizer, sys.argv[2], {QUESTION!r}, {{'max_new_tokens': 12}})))\n"
    )
    image = str(DATA.parent / "shapes_0.png")
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), image], capture_output=True, text=True, env=ONE_THREAD, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == repr(chat_reply(model, processor))


def training_arguments(output_dir, **overrides):
    settings = dict(max_steps=20, per_device_train_batch_size=2, learning_rate=5e-4, seed=0)
    return trainer_arguments(output_dir, **{**settings, **overrides})


def test_trainer_with_gradient_checkpointing_reduces_the_loss_and_the_saved_model_chats_in_a_fresh_process(
    processor, tmp_path
):
    model = freeze(tiny_model(), 2)
    args = TrainingArguments(**with_checkpointing_names(training_arguments(tmp_path, gradient_checkpointing=True)))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=load_jsonl(DATA),
        data_collator=NaViLDataCollator(processor, multiscale=False),
        compute_loss_func=causal_lm_loss,
    )
    trainer.train()
    assert model.language_model.model.layers[0].gradient_checkpointing
    assert_loss_decreased(trained_losses(trainer))
    trainer.save_model(tmp_path)
    processor.save_pretrained(tmp_path)
    assert_chats_the_same_in_a_fresh_process(tmp_path, model, processor)


def test_sft_trainer_reduces_the_loss_and_the_saved_model_chats_in_a_fresh_process(processor, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model = tiny_model()
    settings = training_arguments(tmp_path, gradient_checkpointing=True, max_length=None)
    args = trl.SFTConfig(**settings, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(load_jsonl(DATA)),
        processing_class=processor,
        data_collator=NaViLDataCollator(processor, multiscale=False),
    )
    trainer.train()
    assert_loss_decreased(trained_losses(trainer))
    trainer.save_model(tmp_path)
    processor.save_pretrained(tmp_path)
    assert_chats_the_same_in_a_fresh_process(tmp_path, model, processor)


def batch_of(processor, examples):
    batch = NaViLDataCollator(processor, multiscale=False)(examples)
    batch.pop("labels")
    return batch


def test_lora_on_text_and_visual_experts_merges_into_a_model_with_the_same_logits(processor, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(model.config, "both"))
    lora = peft.get_peft_model(model, config)
    adapted = {name.split(".lora_")[0] for name, _ in lora.named_parameters() if ".lora_A." in name}
    assert any(name.endswith("_ve") for name in adapted) and any("mlp_ve." in name for name in adapted)
    assert any(name.endswith("self_attn.q_proj") for name in adapted) and any(".mlp." in name for name in adapted)
    assert not any("vision_model" in name for name in adapted)
    args = TrainingArguments(**training_arguments(tmp_path, max_steps=3))
    examples = load_jsonl(DATA)
    collator = NaViLDataCollator(processor, multiscale=False)
    Trainer(
        model=lora, args=args, train_dataset=examples, data_collator=collator, compute_loss_func=causal_lm_loss
    ).train()
    # compared in float64: in float32, W·x + B·A·x and (W + B·A)·x differ by rounding (up to 2e-5 in these logits)
    batch = batch_of(processor, examples[:4])
    batch["pixel_values"] = batch["pixel_values"].double()
    lora = lora.double()
    with torch.no_grad():
        adapter_logits = lora.eval()(**batch).logits
        merged = lora.merge_and_unload()
        merged_logits = merged(**batch).logits
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", ["qwen3", "internlm2"])
def test_a_peft_wrapped_model_still_routes_tokens_by_modality(processor, backbone):
    """LoRA on the visual experts alone leaves a text-only prompt's logits unchanged and changes an image prompt's;
    LoRA on the text experts changes the text-only prompt's."""
    peft = pytest.importorskip("peft")
    from navil.modeling_navil import NaViLForConditionalGeneration
    from navil.testing import tiny_config

    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(tiny_config(backbone, vocab_size=len(processor.tokenizer))).eval()
    model.init_special_token_ids(processor.tokenizer)
    examples = load_jsonl(DATA)
    text_only = batch_of(processor, [{"messages": [message("user", "Hi?"), message("assistant", "yes")]}])
    with_image = batch_of(processor, examples[:1])
    with torch.no_grad():
        base = [model(**batch).logits for batch in (text_only, with_image)]
    for experts, text_changes in (("visual", False), ("text", True)):
        config = peft.LoraConfig(
            r=4, target_modules=lora_target_modules(model.config, experts), init_lora_weights=False
        )
        lora = peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            text_logits, image_logits = (lora(**batch).logits for batch in (text_only, with_image))
        assert torch.equal(text_logits, base[0]) != text_changes, experts
        assert not torch.allclose(image_logits, base[1]), experts
        model = lora.unload()


def test_stage_one_trains_vision_connector_and_visual_experts_and_leaves_every_text_weight_bit_identical(
    processor, tmp_path
):
    model = freeze(tiny_model(), 1)
    collator = NaViLDataCollator(processor, multiscale=False)
    examples = load_jsonl(DATA)[:2]
    causal_lm_loss(model(**collator(examples)), collator(examples)["labels"]).backward()
    # the last layer's visual-expert query, output and FFN act on image positions only, whose next-token predictions
    # carry no labels: they get exactly zero gradient (and AdamW leaves them unchanged)
    last = f"layers.{model.config.text_config.num_hidden_layers - 1}."
    no_gradient = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    no_gradient = {name for name in no_gradient if not model.get_parameter(name).grad.any()}
    assert no_gradient and all(last in name and "_ve" in name for name in no_gradient), no_gradient
    model.zero_grad(set_to_none=True)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = TrainingArguments(**training_arguments(tmp_path, max_steps=1))
    Trainer(
        model=model, args=args, train_dataset=examples, data_collator=collator, compute_loss_func=causal_lm_loss
    ).train()
    for name, parameter in model.named_parameters():
        text_weight = name.startswith("language_model.") and "_ve." not in name
        assert torch.equal(parameter, before[name]) == (text_weight or name in no_gradient), name


def test_freezing_stages_two_and_vision_frozen_and_unknown_stages():
    model = tiny_model()
    freeze(model, "vision_frozen")
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad != name.startswith("vision_model."), name
    assert all(parameter.requires_grad for parameter in freeze(model, 2).parameters())
    with pytest.raises(ValueError, match="Unknown training stage 3"):
        freeze(model, 3)


def run_finetune(launcher, output_dir, batch_size, *flags):
    """`navil finetune` on the example data for 10 steps, 20 training examples (3 held out), in a fresh process."""
    command = finetune_command(output_dir, launcher=launcher)
    command += ["--max-steps", "10", "--eval-fraction", "0.13", "--no-multiscale", "--learning-rate", "5e-4"]
    command += ["--batch-size", str(batch_size), "--quiet", *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output_dir / "log_history.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


def test_navil_finetune_with_lora_saves_a_merged_model_that_chats_in_a_fresh_process(processor, tmp_path):
    pytest.importorskip("peft")
    losses = run_finetune([sys.executable], tmp_path, 2, "--lora", "both", "--gradient-checkpointing")
    assert len(losses) == 10
    model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert_chats_the_same_in_a_fresh_process(tmp_path, model, processor)


# Two processes through accelerate: without MPI, `--cpu --num_processes 2` starts one process (refused by
# `check_launch`), while `--multi_gpu` starts two through torch's elastic launcher, which train on the CPU (gloo).
ACCELERATE_TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE_TWO_PROCESSES += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_a_cpu_launch_that_would_train_in_one_process_instead_of_several_is_refused_with_the_command_that_works():
    single_process_of_two = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes N"):
        check_launch(single_process_of_two)
    check_launch({**single_process_of_two, "WORLD_SIZE": "2", "RANK": "0"})  # elastic launcher
    check_launch({**single_process_of_two, "PMI_SIZE": "2"})  # mpirun
    check_launch({"ACCELERATE_USE_CPU": "True"})  # --num_processes 1
    check_launch({})


@pytest.mark.multiprocess
def test_two_process_ddp_follows_the_single_process_loss_curve_of_the_same_global_batch(tmp_path):
    single = run_finetune([sys.executable], tmp_path / "single", 4)
    ddp = run_finetune(ACCELERATE_TWO_PROCESSES, tmp_path / "ddp", 2)
    assert len(ddp) == len(single) == 10
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=0, atol=1e-4)


# One training loop for a single process and for FSDP2 under `accelerate launch` (accelerate's own FSDP plugin runs on
# GPUs only, so the loop shards the model with `fsdp_shard`): each of
# the 10 steps takes the next 4 examples, split evenly over the processes, with the loss normalised by the labelled
# tokens of the global batch; the full state dict is gathered and saved by rank 0.
FSDP_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from transformers import AutoModel, AutoProcessor
from navil.training import NaViLDataCollator, causal_lm_loss, close_process_group, fsdp_shard, load_jsonl

model_dir, data, out = sys.argv[1:4]
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).train()
if world > 1:
    dist.init_process_group("gloo")
    fsdp_shard(model)
collator = NaViLDataCollator(processor, multiscale=False)
examples = load_jsonl(data)[:20]
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
losses = []
for step in range(10):
    chunk = examples[(4 * step) % 20 :][:4]
    batch = collator(chunk[rank * 4 // world : (rank + 1) * 4 // world])
    labels = batch.pop("labels")
    count = (labels[:, 1:] != -100).sum()
    if world > 1:
        dist.all_reduce(count)
    loss = causal_lm_loss(model(**batch), labels, num_items_in_batch=count) * world  # FSDP averages gradients
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    reported = loss.detach() / world
    if world > 1:
        dist.all_reduce(reported)
    losses.append(reported.item())
if world > 1:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # fully_shard changed the model's class: save the gathered weights through a plain model
        model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
        model.load_state_dict(state)
if rank == 0:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    Path(out, "losses.json").write_text(json.dumps(losses))
if world > 1:
    del model, optimizer, state
    close_process_group()
"""


@pytest.mark.multiprocess
def test_two_process_fsdp2_follows_the_single_process_loss_curve_and_its_full_checkpoint_chats(processor, tmp_path):
    script = tmp_path / "fsdp_finetune.py"
    script.write_text(FSDP_SCRIPT)
    runs = {
        "single": [sys.executable],
        "sharded": ACCELERATE_TWO_PROCESSES,
    }
    for name, launcher in runs.items():
        command = [*launcher, str(script), str(TINY), str(DATA), str(tmp_path / name)]
        result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, cwd="/")
        assert result.returncode == 0, result.stderr[-3000:]
    single, sharded_losses = (json.loads((tmp_path / name / "losses.json").read_text()) for name in runs)
    assert len(sharded_losses) == len(single) == 10
    torch.testing.assert_close(torch.tensor(sharded_losses), torch.tensor(single), rtol=0, atol=1e-4)
    sharded = AutoModel.from_pretrained(tmp_path / "sharded", trust_remote_code=True)
    reference = AutoModel.from_pretrained(tmp_path / "single", trust_remote_code=True)
    for (name, weight), (_, expected) in zip(sharded.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-4, msg=name)
    assert_chats_the_same_in_a_fresh_process(tmp_path / "sharded", sharded, processor)
