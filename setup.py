from setuptools import find_packages, setup

setup(
    name="megaclip",
    version="0.1.0",
    description="Pretraining of CLIP-family models (CLIP, SigLIP, MaskCLIP, SILC) on DeepSpeed ZeRO-3",
    packages=find_packages(include=["megaclip", "megaclip.*"]),
    package_data={"megaclip": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.16",
        "timm>=1.0",
        "webdataset>=1.0",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "pyyaml>=6",
        "pillow>=10",
        "numpy",
        "tqdm",
        "safetensors>=0.4",
    ],
    # NVIDIA apex is optional and built from source on GPU clusters; the registry package
    # named "apex" is an unrelated project and must never be installed.
    # transformers only for the hf export (tools/convert_checkpoint.py --formats hf), imported
    # there alone: training never needs it.
    extras_require={"test": ["pytest>=8", "pytest-timeout", "open_clip_torch>=2.24",
                             "transformers==5.25.0"],
                    "hf": ["transformers==5.25.0"]},
)
