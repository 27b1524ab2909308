"""Triton kernels for policy-gradient training, each with its PyTorch reference beside it.

Installed as ``fastppo.kernels``. Every public function takes ``backend="auto"``: CUDA tensors
run the Triton kernels, anything else runs the reference (which is also the test oracle).
"""

if __name__ != "fastppo.kernels":
    # The repository root was put on sys.path (e.g. `python -m pytest` from the checkout) and this
    # folder shadowed Hugging Face's `kernels` package, which transformers and bitsandbytes import.
    raise ImportError(
        f"this folder is the package 'fastppo.kernels' but was imported as {__name__!r}; "
        "import fastppo.kernels instead, and run tools from outside the repository root "
        "(or with pytest's --import-mode=importlib) so `kernels` resolves to Hugging Face's package."
    )

from .linear_ppo_loss import linear_ppo_loss, linear_token_logprobs
from .ppo_loss import PolicyLossSettings, PolicyLossStats, fused_policy_loss
from .token_logprobs import token_logprobs

__all__ = [
    "PolicyLossSettings",
    "PolicyLossStats",
    "fused_policy_loss",
    "linear_ppo_loss",
    "linear_token_logprobs",
    "token_logprobs",
]
