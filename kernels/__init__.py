"""Triton kernels for policy-gradient training, each with its PyTorch reference beside it.

Installed as ``fastppo.kernels``. Every public function takes ``backend="auto"``: CUDA tensors
run the Triton kernels, anything else runs the reference (which is also the test oracle).
"""

if __name__ == "fastppo.kernels":
    from .linear_ppo_loss import linear_ppo_loss, linear_token_logprobs
    from .ppo_loss import PolicyLossSettings, PolicyLossStats, fused_policy_loss
    from .token_logprobs import token_logprobs
else:
    # The repository root is on sys.path and this folder shadows Hugging Face's `kernels`.
    from ._shadow import step_aside

    step_aside(__name__, globals())

__all__ = [
    "PolicyLossSettings",
    "PolicyLossStats",
    "fused_policy_loss",
    "linear_ppo_loss",
    "linear_token_logprobs",
    "token_logprobs",
]
