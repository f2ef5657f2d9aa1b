"""transformers' own contract: its common model, processor and image-processor tests, run against NaViL.

The mixins come from the source distribution of the INSTALLED transformers (the wheel does not ship its tests):
`.ci/transformers_sdist.sh DEST` unpacks it, and this module reads it from `$NAVIL_TRANSFORMERS_SRC` (default
`~/.cache/navil/transformers-src`). Without it, or for another transformers version, the module is skipped.

The sdist lacks `tests/generation`, `tests/exporters` and `utils/fetch_hub_objects_for_ci.py`: the two mixins that
`test_modeling_common.py` imports from there are replaced by empty classes, and `url_to_local_path` maps the
processor tests' image URLs to a local image (tests run offline). Each mixin test that does not apply to NaViL is
skipped below with its reason.
"""

import atexit
import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
import types
import unittest
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from navil.configuration_navil import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
    SPECIAL_TOKEN_EMBEDDING_ROWS,
    NaViLConfig,
)
from navil.image_processing_navil import NaViLImageProcessor
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.processing_navil import NaViLProcessor
from navil.testing import tiny_config

SOURCE_VARIABLE = "NAVIL_TRANSFORMERS_SRC"
SOURCE = Path(os.environ.get(SOURCE_VARIABLE) or Path.home() / ".cache" / "navil" / "transformers-src")
PACKAGE = "transformers_common_tests"  # the sdist's tests/ package, imported under a name of its own
TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "navil-tiny"


def sdist_version(source: Path):
    """The version in the sdist's PKG-INFO, or None when `source` holds no transformers sdist with its tests."""
    if not (source / "tests" / "test_modeling_common.py").is_file() or not (source / "PKG-INFO").is_file():
        return None
    for line in (source / "PKG-INFO").read_text().splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


if sdist_version(SOURCE) != transformers.__version__:
    pytest.skip(
        f"transformers' common tests of version {transformers.__version__} are not in {SOURCE} (found "
        f"{sdist_version(SOURCE)}); run `.ci/transformers_sdist.sh {SOURCE}` or set {SOURCE_VARIABLE}.",
        allow_module_level=True,
    )
pytest.importorskip("parameterized", reason="transformers' common tests need `pip install parameterized`")

LOCAL_IMAGE = Path(tempfile.mkdtemp(prefix="navil-contract-")) / "image.png"
atexit.register(shutil.rmtree, LOCAL_IMAGE.parent, True)
Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(LOCAL_IMAGE)


def url_to_local_path(url, *args, **kwargs):
    """Stand-in for the CI's Hub cache: image URLs become a local image; other media stay URLs (their tests are
    skipped: NaViL takes no audio or video)."""
    return str(LOCAL_IMAGE) if url.endswith((".png", ".jpg", ".jpeg")) else url


def install_sdist_stubs() -> None:
    """Registers the sdist's tests/ as `PACKAGE` and the modules it imports that the sdist lacks."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(SOURCE / "tests")]
    sys.modules[PACKAGE] = package
    for module_name, class_name in (
        ("exporters.test_export", "ExportTesterMixin"),
        ("generation.test_utils", "GenerationTesterMixin"),
    ):
        parent = f"{PACKAGE}.{module_name.split('.')[0]}"
        sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{module_name}")
        setattr(module, class_name, type(class_name, (), {}))
        sys.modules[module.__name__] = module
    fetch = types.ModuleType("fetch_hub_objects_for_ci")
    fetch.url_to_local_path = url_to_local_path
    sys.modules["fetch_hub_objects_for_ci"] = fetch


install_sdist_stubs()
modeling_common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
processing_common = importlib.import_module(f"{PACKAGE}.test_processing_common")
image_processing_common = importlib.import_module(f"{PACKAGE}.test_image_processing_common")

# The processor tests load sub-processors with AutoImageProcessor / AutoTokenizer and no remote code: they resolve
# NaViL folders to these classes in this process, as they do for transformers' own models.
transformers.AutoConfig.register(NaViLConfig.model_type, NaViLConfig, exist_ok=True)
transformers.AutoImageProcessor.register(NaViLConfig, NaViLImageProcessor, exist_ok=True)


def not_applicable(reason: str):
    """A mixin test replaced by a skip: the feature it checks is not part of NaViL."""

    def test(self):
        self.skipTest(reason)

    return test


# -- model ---------------------------------------------------------------------------------------------------------


class NaViLModelTester:
    """Inputs of the common model tests: per row one image of 4x4 patches (a single scale) between 6 text tokens.

    The special tokens take the low ids from `FIRST_SPECIAL_ID` on (as the image tokens of transformers' own VLM
    testers do), so that shrinking the vocabulary in the resize tests keeps them, and the ids below it, which the
    eager/SDPA tests use for padding rows, stay text.
    """

    FIRST_SPECIAL_ID = 5

    def __init__(self, parent, backbone: str, batch_size: int = 2, text_tokens: int = 6, image_grid=(1, 4, 4)):
        self.parent = parent
        self.backbone = backbone
        self.batch_size = batch_size
        self.text_tokens = text_tokens
        self.image_grid = image_grid
        self.is_training = True
        self.text_only = False
        config = self.get_config()
        self.vision_config = config.vision_config.to_dict()
        self.text_config = config.text_config.to_dict()
        self.vocab_size = config.text_config.vocab_size
        self.hidden_size = config.text_config.hidden_size
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.num_attention_heads = config.text_config.num_attention_heads
        self.seq_length = text_tokens + len(self.image_token_ids(config))

    def get_config(self) -> NaViLConfig:
        special = {token: self.FIRST_SPECIAL_ID + row for row, token in enumerate(SPECIAL_TOKEN_EMBEDDING_ROWS)}
        return tiny_config(self.backbone, special_token_ids=special)

    def image_token_ids(self, config: NaViLConfig) -> list[int]:
        """The prompt tokens of one image-scale, as the processor expands `<image>`."""
        ids = config.special_token_ids
        _, height, width = self.image_grid
        merge = config.vision_config.merge_size
        line = [ids[IMG_CONTEXT_TOKEN]] * (width // merge) + [ids[IMG_LINE_BREAK_TOKEN]]
        return [ids[IMG_START_TOKEN], *line * (height // merge), ids[IMG_FRAME_BREAK_TOKEN], ids[IMG_END_TOKEN]]

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        first_text = max(config.special_token_ids.values()) + 1
        text = first_text + modeling_common.ids_tensor(
            [self.batch_size, self.text_tokens], self.vocab_size - first_text
        )
        if self.text_only:
            return config, {"input_ids": text, "attention_mask": torch.ones_like(text)}
        image = torch.tensor(self.image_token_ids(config)).expand(self.batch_size, -1)
        half = self.text_tokens // 2
        input_ids = torch.cat((text[:, :half], image, text[:, half:]), dim=1)
        frames, height, width = self.image_grid
        vision = config.vision_config
        patches = self.batch_size * frames * height * width
        pixel_values = modeling_common.floats_tensor([patches, vision.num_channels * vision.patch_size**2])
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "image_grid_thw": torch.tensor([self.image_grid] * self.batch_size),
        }
        return config, inputs


class NaViLModelTestBase(modeling_common.ModelTesterMixin):
    all_model_classes = (NaViLForConditionalGeneration,)
    backbone = None
    _is_composite = True
    test_torch_exportable = False  # ExportTesterMixin is not in the sdist
    test_can_init_all_missing_weights_before_2023 = True  # the mixin dates models by a copyright line we do not have

    def setUp(self):
        self.model_tester = NaViLModelTester(self, self.backbone)
        # The eager/SDPA comparison passes only `input_ids` (cut and padded per row), never the pixels: its prompts are
        # text, since image tokens without pixel_values are refused.
        self.model_tester.text_only = self._testMethodName.startswith("test_eager_matches_sdpa_inference")
        # The mixin picks its image-text-to-text checks (labels for the training tests, the loss of shifted labels)
        # by class name from transformers' own mapping; NaViL is listed there for the duration of each test.
        listing = patch.dict(
            modeling_common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
            {NaViLConfig.model_type: NaViLForConditionalGeneration.__name__},
        )
        listing.start()
        self.addCleanup(listing.stop)

    test_model_weights_reload_no_missing_tied_weights = not_applicable(
        "NaViL loads strictly: a checkpoint with missing tensors raises a ValueError (documented choice)."
    )

    def test_can_init_all_missing_weights(self):
        """The mixin's check that `_init_weights` initialises every weight of an empty checkpoint as `__init__` does,
        loading with `strict=False` (NaViL refuses incomplete checkpoints by default)."""
        lenient = functools.partial(NaViLForConditionalGeneration.from_pretrained, strict=False)
        with patch.object(NaViLForConditionalGeneration, "from_pretrained", lenient):
            super().test_can_init_all_missing_weights()

    test_generation_tester_mixin_inheritance = not_applicable(
        "GenerationTesterMixin (tests/generation) is not in the sdist; generate is tested in test_modeling.py and "
        "test_chat.py."
    )


class InternLM2VEModelTest(NaViLModelTestBase, unittest.TestCase):
    backbone = "internlm2"


class Qwen3VEModelTest(NaViLModelTestBase, unittest.TestCase):
    backbone = "qwen3"


# -- image processor -----------------------------------------------------------------------------------------------


class NaViLImageProcessingTester(image_processing_common.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("min_pixels", 16 * 16 * 4)
        kwargs.setdefault("max_pixels", 16 * 16 * 64)
        super().__init__(parent, batch_size=3, min_resolution=30, max_resolution=120, **kwargs)

    def _get_image_processing_classes(self):
        return {"pil": NaViLImageProcessor}


class NaViLImageProcessingTest(image_processing_common.ImageProcessingTestMixin, unittest.TestCase):
    """The mixin's call tests expect `[images, channels, height, width]` pixels; NaViL returns the patches of all
    image-scales (`[patches, 3 * P * P]`) with their grids, so those tests are replaced by the same calls checked
    against NaViL's output contract."""

    image_processor_tester_class = NaViLImageProcessingTester

    def _assert_has_attributes(self, processor, expected_attributes):
        """The mixin's check, reading `min_pixels` and `max_pixels` as NaViL keeps them: as attributes (the mixin
        expects them inside a Qwen2-VL style `size`)."""
        expected_attributes = dict(expected_attributes)
        for key in ("min_pixels", "max_pixels"):
            if key in expected_attributes:
                self.assertEqual(getattr(processor, key), expected_attributes.pop(key), key)
        super()._assert_has_attributes(processor, expected_attributes)

    def check_patch_outputs(self, image_processor, images, **kwargs):
        """Calls `image_processor` on one image and on all `images` and checks the patch layout of the outputs."""
        for batch in (images[:1], images):
            inputs = image_processor(batch if len(batch) > 1 else batch[0], return_tensors="pt", **kwargs)
            grids, num_scales = inputs["image_grid_thw"], inputs["num_scales"]
            patch = image_processor.patch_size
            self.assertEqual(tuple(num_scales.shape), (len(batch),))
            self.assertEqual(int(num_scales.sum()), len(grids))
            self.assertEqual(tuple(inputs["pixel_values"].shape), (int(grids.prod(-1).sum()), 3 * patch * patch))
            self.assertTrue(bool((grids[:, 1:] % image_processor.merge_size == 0).all()))

    def test_call_pil(self):
        image_processor = NaViLImageProcessor(**self.image_processor_dict)
        self.check_patch_outputs(image_processor, self.image_processor_tester.prepare_image_inputs())

    def test_call_numpy(self):
        image_processor = NaViLImageProcessor(**self.image_processor_dict)
        self.check_patch_outputs(image_processor, self.image_processor_tester.prepare_image_inputs(numpify=True))

    def test_call_pytorch(self):
        image_processor = NaViLImageProcessor(**self.image_processor_dict)
        self.check_patch_outputs(image_processor, self.image_processor_tester.prepare_image_inputs(torchify=True))

    def test_call_numpy_4_channels(self):
        """4-channel images are accepted and lose their 4th channel (documented), so they give the outputs of their
        first three channels."""
        image_processor = NaViLImageProcessor(**self.image_processor_dict)
        self.image_processor_tester.num_channels = 4
        images = self.image_processor_tester.prepare_image_inputs(numpify=True)
        self.check_patch_outputs(image_processor, images)
        rgba, rgb = image_processor(images), image_processor([image[..., :3] for image in images])
        for key in rgb:
            np.testing.assert_array_equal(rgba[key], rgb[key])

    test_new_models_require_torchvision_backend = not_applicable(
        "torchvision is not a NaViL dependency: the PIL backend is the one that reproduces the original bit for bit."
    )


# -- processor -----------------------------------------------------------------------------------------------------


class NaViLProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = NaViLProcessor
    model_id = str(TINY_CHECKPOINT)

    @staticmethod
    def prepare_processor_dict():
        """The settings of the checkpoint's processor besides its sub-processors (its prompt template)."""
        saved = json.loads((TINY_CHECKPOINT / "processor_config.json").read_text())
        return {key: saved[key] for key in ("template", "system_message")}
