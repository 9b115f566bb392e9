from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vil_kernels",
    version="0.1.0",
    description="Fused Triton kernels for the chunkwise mLSTM and the Vision-LSTM (ViL) built on them",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vil_kernels", "vil_kernels.*", "vil", "vil.*"]),
    python_requires=">=3.10",
    # A bare torch requirement would pull a multi-GB CUDA build onto CPU machines: any torch
    # already installed that is new enough is kept (install the build you want first). The
    # floors are the oldest releases the test suite was run on (docs/versions.md): torch 2.6
    # with triton 3.2 failed torch.compile of the PyTorch cell and FSDP; torch 2.8 passed.
    install_requires=[
        "torch>=2.8",
        "einops>=0.7",
        "numpy",
        'triton>=3.4; platform_system == "Linux" and (platform_machine == "x86_64" or platform_machine == "aarch64")',
    ],
    extras_require={
        # Pillow decodes images for vil.train where torchvision is absent (its build must match
        # the installed torch, so it is never pulled in here); tqdm draws progress bars and
        # matplotlib the resolution-sweep plot of bench/throughput.py.
        "test": ["pytest>=8", "pytest-benchmark>=4", "pillow>=9", "matplotlib>=3.7"],
        "train": ["pillow>=9", "tqdm>=4.60"],
        "bench": ["tqdm>=4.60", "matplotlib>=3.7"],
    },
)
