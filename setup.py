"""Install with ``pip install -e .`` (see README.md)."""
from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name):
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="ppdiffusers_fast",
    version="0.1.0",
    description="Few-step FLUX distillation (PCM, DMD2, FLUX-Lightning) with LoRA and compiled inference in PaddlePaddle",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppdiffusers_fast", "ppdiffusers_fast.*"]),
    package_data={"ppdiffusers_fast": ["**/*.md", "**/*.json"]},
    python_requires=">=3.9",
    install_requires=read_requirements("requirements.txt"),
    extras_require={"data": read_requirements("requirements-data.txt"),
                    "test": read_requirements("requirements-test.txt") + read_requirements("requirements-data.txt")},
)
