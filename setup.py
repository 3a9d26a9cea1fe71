"""Packaging for longqlora: long-context extension of Llama-family models with NF4, PI, S2-Attn and LoRA+."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="longqlora",
    version="0.1.0",
    description="Extend the context window of Llama-family models on one GPU: NF4 + position interpolation + S2-Attn + LoRA+",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["longqlora", "longqlora.*"]),
    package_data={"longqlora": ["data/*.txt.gz", "data/*.md"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.28"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["longqlora=longqlora.cli:main"]},
)
