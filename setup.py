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
    packages=["navil"],
    package_dir={"navil": "."},
    package_data={"navil": ["tokenizer/*", "checkpoints/*/*", "examples/*"]},
    install_requires=[
        "transformers>=4.51",
        "torch>=2.1",
        "safetensors",
        "accelerate",
        "pillow",
        "huggingface-hub",
    ],
    extras_require={
        # tqdm comes with transformers; hypothesis drives the property-based tests.
        "test": ["pytest", "hypothesis"],
        # matplotlib draws the benchmark chart.
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["navil=navil.cli:main"]},
)
