"""Ranges for people installing mtpeft into their own environment. The project's own installs
(``make install``, CI) go through ``requirements.lock``, the exact set the suite passed on.

Upper bounds sit on the packages whose internals mtpeft touches (transformers' cache and attention
signatures, peft's export format, DeepSpeed's ZeRO-3 hooks, bitsandbytes' NF4 layout, Triton's
compiler API), at the newest release the suite passed on; ``make test-latest`` tries newer ones.
"""

from setuptools import find_packages, setup

setup(
    name="mtpeft",
    version="0.1.0",
    description="Multitask parameter-efficient fine-tuning of code LLMs on DeepSpeed ZeRO-3 with NF4 and Triton kernels",
    packages=find_packages(include=["mtpeft", "mtpeft.*"]),
    package_data={"mtpeft": ["assets/**/*", "profile/archs/*.json", "configs/*.yaml", "ds_configs/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<=0.19.8",
        "transformers>=4.45,<=5.24.0",
        "peft>=0.13,<=0.21.2",
        "bitsandbytes>=0.45,<=0.50.2",
        "datasets>=3.0",
        "tensorboard>=2.15",
        "triton>=3.0,<=3.9.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
        # evaluation: scores depend on these versions (the grammar shapes CodeBLEU's syntax and data flow)
        "codebleu>=0.7.0,<=0.7.0",
        "tree-sitter>=0.22,<0.23",
        "tree-sitter-python>=0.21,<0.22",
        "sacrebleu>=2.4,<=2.6.0",
    ],
    extras_require={"test": ["pytest>=7.0", "pytest-timeout>=2.3"]},
    entry_points={"console_scripts": ["mtpeft=mtpeft.cli:main"]},
)
