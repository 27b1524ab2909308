"""fastppo: kernel-accelerated PPO/GRPO training for Hugging Face causal language models."""

__version__ = "0.1.0"

# Trainers load lazily: `import fastppo.kernels` must not pay for transformers/accelerate.
_LAZY = {
    "GRPOConfig": "fastppo.grpo_config",
    "GRPOTrainer": "fastppo.trainer.grpo",
    "PPOConfig": "fastppo.ppo_config",
    "PPOTrainer": "fastppo.trainer.ppo",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastppo' has no attribute {name!r}")


__all__ = ["GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "__version__"]
