from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="hivit-mae",
    version="0.1.0",
    description="HiViT-MAE (HiViT pre-trained with masked autoencoding) for Hugging Face transformers, "
    "numerically matching mmpretrain",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    py_modules=[
        "configuration_hivit_mae",
        "modeling_hivit_mae",
        "convert_checkpoint",
        "run_pretraining",
        "run_classification",
        "visualize_reconstruction",
    ],
    packages=find_packages(include=["hivit_mae_tools", "hivit_mae_tools.*"]),
    install_requires=[
        "torch>=2.1",
        "transformers>=4.57",
        "safetensors",
        "huggingface_hub",
        "numpy",
        # Pre-training: Trainer runs on accelerate; images come through datasets, torchvision and Pillow; the
        # built-in default trains on the photographs that ship inside scikit-image.
        "accelerate>=1.1",
        "datasets>=2.19",
        "torchvision",
        "pillow",
        "scikit-image",
    ],
    extras_require={
        "test": [
            "pytest",
            "ruff",
            # The numerical reference; mmpretrain imports torchvision and mmcv at import time.
            "mmpretrain==1.2.0",
            "mmengine==0.10.7",
            "mmcv-lite==2.2.0",
        ],
    },
)
