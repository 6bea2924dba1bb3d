from pathlib import Path

from setuptools import Extension, find_packages, setup

# the native CPU GEMV kernels (glm_tp/kernels/native.py loads them with ctypes): optional, so a machine
# without a C compiler still installs, and glm_tp runs its other kernels
NATIVE = Extension(
    "glm_tp.kernels._gemv",
    sources=[f"glm_tp/kernels/csrc/{name}.c" for name in ("gemv", "gemv_x86", "pool", "attention")],
    depends=["glm_tp/kernels/csrc/gemv.h"],
    extra_compile_args=["-O3", "-std=c11", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["m"],
    optional=True,
)

setup(
    name="glm-tp",
    version="0.1.0",
    description="Tensor-parallel inference runtime for GLM-130B-class models (fp16/bf16, INT8/INT4, blank infilling)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["glm_tp", "glm_tp.*"]),
    include_package_data=True,
    ext_modules=[NATIVE],
    # run settings, the playground page and the demo model ship in the package: the commands work from any folder
    package_data={"glm_tp": ["configs/*.yaml", "configs/*/*.yaml", "server/playground.html",
                             "demo/latest", "demo/*.json", "demo/*.model", "demo/*/*.pt"]},
    # torch is pinned by the installer (see README): an open requirement would pull a CUDA build
    install_requires=["torch>=2.3", "numpy", "tqdm", "hydra-core>=1.3", "sentencepiece", "safetensors"],
    extras_require={
        "server": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"],
        # the CPU decode kernels (glm_tp/kernels/cpu.py); without numba torch's kernels are used
        "cpu": ["numba>=0.59"],
        # GLM-4's byte-level BPE tokenizer (glm_tp/text/bpe.py): tiktoken ranks or a tokenizer.json
        "glm4": ["tiktoken>=0.6", "tokenizers>=0.19"],
        # structured output (response_format, a blank's answer under a regex): glm_tp/engine/grammar.py
        "grammar": ["llguidance>=1.9,<2"],
        # the server's tests drive it with the official client and a real browser (selenium + system chromium)
        "test": ["pytest>=7", "fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "openai>=1.40",
                 "httpx>=0.27", "selenium>=4.20", "numba>=0.59", "schemathesis>=4.0", "transformers>=4.46",
                 "tiktoken>=0.6", "tokenizers>=0.19", "jsonschema>=4"],
        "reference": ["SwissArmyTransformer", "requests", "triton", "deepspeed", "wandb", "einops", "transformers"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": [
        "glm-tp-generate = glm_tp.cli.generate:main",
        "glm-tp-make-checkpoint = glm_tp.cli.make_checkpoint:main",
        "glm-tp-verify = glm_tp.cli.verify:main",
        "glm-tp-repartition = glm_tp.cli.convert:repartition_main",
        "glm-tp-quantize = glm_tp.cli.convert:quantize_main",
    ]},
)
