from setuptools import find_packages, setup

setup(
    name="minimaml",
    version="0.1.0",
    description="A small, exact NumPy/CuPy implementation of MAML (Finn, Abbeel & Levine, 2017).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minimaml", "minimaml.*"]),
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "pillow>=9.0",
        "tqdm>=4.60",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.80"],
        "gpu": ["cupy-cuda12x>=13"],
        "mpi": ["mpi4py>=4.0", "mpich>=4.1"],  # the meta-batch over ranks (docs/distributed.md); mpich ships mpiexec
        "mujoco": ["mujoco>=3.1", "gymnasium>=1.0", "imageio>=2.14"],  # gymnasium's MuJoCo envs import imageio
    },
)
