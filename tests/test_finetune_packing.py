"""`finetune(packing=True)` (what `navil finetune --packing` runs): examples longer than the pack budget are left
out with a counted warning, a run of only such examples is refused, and a stream packs only as a StreamingDataset.
The resumed and distributed packed runs are in test_resume.py and test_distributed_at_scale.py."""

import json
from pathlib import Path

import pytest
import torch

from navil.training import finetune, load_jsonl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "finetune" / "train.jsonl"
TINY = str(ROOT / "checkpoints" / "navil-tiny")
SETTINGS = dict(
    eval_fraction=0, multiscale=False, max_steps=1, logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none"
)


def test_examples_longer_than_the_budget_are_left_out_with_a_counted_warning_and_the_rest_train(tmp_path):
    # without multiscale, 7 of the 23 example chats have 156 to 176 tokens, the others 79 to 108
    with pytest.warns(UserWarning, match=r"Left out 7 training examples longer than max_packed_tokens=150"):
        trainer = finetune(TINY, DATA, str(tmp_path), packing=True, max_packed_tokens=150, **SETTINGS)
    assert trainer.train_dataset.lengths and max(trainer.train_dataset.lengths) <= 150
    assert sum(map(len, trainer.train_dataset.packs)) == 16
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert [entry["padding_share"] for entry in history if "loss" in entry] == [0.0]


def test_a_run_whose_every_example_is_longer_than_the_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Every training example is longer than max_packed_tokens=64"):
        finetune(TINY, DATA, str(tmp_path), packing=True, max_packed_tokens=64, **SETTINGS)


def test_packing_an_iterable_that_is_not_a_streaming_dataset_is_refused_before_the_model_loads(tmp_path):
    class Examples(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(load_jsonl(DATA))

    with pytest.raises(ValueError, match="only when it is a streaming.StreamingDataset"):
        finetune("/nonexistent/model", None, str(tmp_path / "out"), train_dataset=Examples(), packing=True)
    assert not (tmp_path / "out").exists()
