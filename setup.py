from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="glm-tp",
    version="0.1.0",
    description="Tensor-parallel inference runtime for GLM-130B-class models (fp16/bf16, INT8/INT4, blank infilling)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["glm_tp", "glm_tp.*"]),
    include_package_data=True,
    package_data={"glm_tp": ["conf/**/*.yaml"]},
    # torch is pinned by the installer (see README): an open requirement would pull a CUDA build
    install_requires=["torch>=2.3", "numpy", "tqdm", "hydra-core>=1.3", "sentencepiece"],
    extras_require={
        "test": ["pytest>=7", "numba>=0.59"],
        # the CPU decode kernels (glm_tp/cpu_kernels.py); without numba torch's kernels are used
        "cpu": ["numba>=0.59"],
        "reference": ["SwissArmyTransformer", "requests", "triton", "deepspeed", "wandb"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["glm-tp-generate = glm_tp.generate:main"]},
)
