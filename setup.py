"""zerofx packaging.

setup.py deliberately does not import torch: under pip's build isolation that would pull a
second, multi-GB CUDA torch into the build environment. The C++ kernels in zerofx/csrc are
JIT-built on first use (torch.utils.cpp_extension.load, cached), so no build step needs torch.
"""
from setuptools import find_packages, setup

setup(
    name="zerofx",
    version="0.1.0",
    description="DeepSpeed-style ZeRO training as a torch.compile backend made of torch.fx passes",
    python_requires=">=3.10",
    # tools/ holds the command-line programs; it is installed as zerofx.tools so the console
    # scripts work after a plain `pip install` (docs/design.md: tools/ sits above the package).
    package_dir={"zerofx": "zerofx", "zerofx.tools": "tools"},
    # every package under zerofx/ (config, checkpoint, tp, passes, runtime and their subpackages)
    packages=["zerofx", "zerofx.tools"] + ["zerofx." + p for p in find_packages("zerofx")],
    package_data={"zerofx": ["csrc/*.cpp", "csrc/*.h", "csrc/*.cu", "passes/README.md"]},
    install_requires=[
        # 2.11 is the oldest torch we support; the upper bound keeps pip from pulling an
        # untested (and, from PyPI, multi-GB CUDA) release next to a pinned CPU wheel.
        "torch>=2.11,<2.14",
        "tabulate>=0.9",
        "networkx>=3.0",
        # torch warns on every import without NumPy; tests and benchmarks use it too.
        "numpy",
        # torch.utils.cpp_extension JIT-builds zerofx/csrc with ninja; without it zerofx
        # falls back to the (slower) plain-torch optimizer math.
        "ninja",
        # the main job's progress bar (tqdm: maintained, no dependencies, handles terminals
        # and pipes, which a hand-drawn bar did not)
        "tqdm>=4.60",
    ],
    extras_require={
        # transformers: the Hugging Face model zoo of the tests (tiny random-init configs);
        # accelerate: transformers' Trainer cannot run without it (tests/test_hf_trainer.py)
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "pytest-timeout>=2",
                 "transformers>=4.45", "accelerate>=1.0,<2"],
        # zerofx.hf.ZerofxTrainer: the Trainer (overrides hooks of transformers 5.x) and
        # Accelerate, which the Trainer requires
        "hf": ["transformers>=5.0,<6", "accelerate>=1.0,<2"],
        # curve.png next to the main job's curve.csv
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={
        # Lets torch.compile(model, backend="zero") find us without `import zerofx`.
        "torch_dynamo_backends": ["zero = zerofx.backend:zero_backend"],
        "console_scripts": [
            "zerofx-launch = zerofx.tools.launch:main",
            "zerofx-dump = zerofx.tools.dump:main",
            "zerofx-consolidate = zerofx.tools.consolidate:main",
            "zerofx-plan = zerofx.tools.plan:main",
            "zerofx-from-deepspeed = zerofx.tools.from_deepspeed:main",
        ],
    },
)
