"""Optimizer choice (8-bit on CUDA, torch AdamW otherwise with one warning; resolved when a config is
built), trainable-only state, and the byte formulas the memory benchmark reports
(``memory.accounting``), checked against the state optimizers really hold."""

import warnings

import pytest
import torch
from torch import nn

from fastppo import optim
from fastppo.memory.accounting import (
    gradient_bytes,
    measured_optimizer_state_bytes,
    optimizer_state_bytes,
    static_training_memory,
    trainable_parameter_count,
    trainable_parameters,
)
from fastppo.optim import build_bnb_optimizer, create_optimizer, default_optim_name, parameter_groups


class Block(nn.Module):
    """Awkward sizes: >= 4096 elements (8-bit state), < 4096 (fp32 state in bitsandbytes), a size
    that is not a multiple of bitsandbytes' 256-element block, biases and a norm."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(300, 17, dtype=dtype)  # 5100 elements: 20 blocks, the last partial
        self.proj = nn.Linear(17, 90, dtype=dtype)  # 1530 + 90 bias: fp32 state in bitsandbytes
        self.norm = nn.LayerNorm(90, dtype=dtype)
        self.out = nn.Linear(90, 64, bias=False, dtype=dtype)  # 5760


def step_once(opt: torch.optim.Optimizer, module: nn.Module) -> None:
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()


def test_torch_adamw_over_trainable_parameters_with_decay_groups():
    model = Block()
    model.embed.requires_grad_(False)
    opt = create_optimizer(model, "adamw_torch", lr=3e-4, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    assert type(opt) is torch.optim.AdamW
    decay, no_decay = opt.param_groups
    assert [id(p) for p in decay["params"]] == [id(model.proj.weight), id(model.out.weight)]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.proj.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6
    step_once(opt, model)
    assert model.embed.weight not in opt.state  # frozen: no state
    assert len(opt.state) == 5


def test_shared_and_tied_parameters_are_optimised_once():
    model = Block()
    twin = nn.Linear(17, 300, bias=False)
    twin.weight = model.embed.weight  # tied
    groups = parameter_groups([model, twin], weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 6


def test_8bit_on_cpu_falls_back_to_torch_adamw_and_warns_once():
    optim.warn_once.cache_clear()
    with pytest.warns(UserWarning, match="'adamw_8bit' falls back to 'adamw_torch'.*CUDA only"):
        opt = create_optimizer(Block(), "adamw_8bit", lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_optimizer(Block(), "adamw_8bit", lr=1e-3)
    assert not [w for w in caught if "falls back" in str(w.message)]
    assert default_optim_name("cpu") == "adamw_torch"


def test_the_bitsandbytes_probe_runs_on_this_processs_gpu(monkeypatch):
    """Under a multi-GPU launch the config is built before accelerate sets the device: the probe
    must use LOCAL_RANK's GPU, or every process opens a CUDA context on GPU 0."""
    tried = []

    def zeros(*size, device=None, **kwargs):
        tried.append(device)
        raise RuntimeError("no GPU here")

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch, "zeros", zeros)
    optim.bitsandbytes_problem.cache_clear()
    try:
        assert "no GPU here" in optim.bitsandbytes_problem("cuda")
    finally:
        optim.bitsandbytes_problem.cache_clear()
    assert tried == [torch.device("cuda", 3)]


def test_bad_names_and_nothing_to_train_are_errors():
    with pytest.raises(ValueError, match="optim must be one of .*'adamw_8bit'.*got 'sgd'"):
        create_optimizer(Block(), "sgd", lr=1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(Block().requires_grad_(False), "adamw_torch", lr=1e-3)
    with pytest.raises(ValueError, match="optim must be one of"):
        optimizer_state_bytes([], "lion")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_adamw_state_bytes_formula(dtype):
    model = Block(dtype)
    model.norm.requires_grad_(False)
    opt = create_optimizer(model, "adamw_torch", lr=1e-3)
    step_once(opt, model)
    params = trainable_parameters(model)
    assert measured_optimizer_state_bytes(opt) == optimizer_state_bytes(params, "adamw_torch")
    # two moments in the parameter dtype + a 4-byte step per tensor: 8 bytes/param in fp32
    n = trainable_parameter_count(model)
    per_param = 2 * torch.finfo(dtype).bits // 8
    assert optimizer_state_bytes(params, "adamw_torch") == per_param * n + 4 * len(params)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_state_bytes_formula(name):
    """bitsandbytes >= 0.45 also steps on CPU, which lets the formula meet real 8-bit state here."""
    model = Block()
    opt = build_bnb_optimizer(parameter_groups(model, 0.0), name, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
            step_once(opt, model)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this bitsandbytes build has no CPU optimizer ({exc})")
    assert measured_optimizer_state_bytes(opt) == optimizer_state_bytes(trainable_parameters(model), name)


def test_8bit_state_is_about_two_bytes_per_parameter():
    big = [torch.empty(4096, 4096, device="meta"), torch.empty(151936, 896, device="meta")]
    n = sum(p.numel() for p in big)
    assert 2.0 < optimizer_state_bytes(big, "adamw_8bit") / n < 2.04
    assert optimizer_state_bytes(big, "adamw_torch") / n == pytest.approx(8.0, rel=1e-6)


def test_static_training_memory_matches_what_training_holds():
    model = Block()
    model.embed.requires_grad_(False)
    frozen_copy = Block().requires_grad_(False)  # e.g. a reference: parameters only
    opt = create_optimizer(model, "adamw_torch", lr=1e-3)
    step_once(opt, model)
    plan = static_training_memory([model, frozen_copy], "adamw_torch")
    all_params = [*model.parameters(), *frozen_copy.parameters()]
    assert plan.parameters == sum(p.numel() * 4 for p in all_params)
    assert plan.gradients == sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    assert plan.gradients == gradient_bytes(model)
    assert plan.optimizer_states == measured_optimizer_state_bytes(opt)
    assert plan.total == plan.parameters + plan.gradients + plan.optimizer_states


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_is_the_cuda_default_and_holds_the_formula_bytes(name):
    assert default_optim_name("cuda") == "adamw_8bit"
    model = Block().cuda()
    opt = create_optimizer(model, name, lr=1e-3)
    assert type(opt).__module__.startswith("bitsandbytes")
    step_once(opt, model)
    assert measured_optimizer_state_bytes(opt) == optimizer_state_bytes(trainable_parameters(model), name)


def test_config_optim_defaults_and_8bit_fallback_warns_once_on_cpu(grpo_config):
    optim.warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert grpo_config().optim == "adamw_torch"  # None -> adamw_torch on CPU, quietly
    assert not [w for w in caught if "falls back" in str(w.message)]
    with pytest.warns(UserWarning, match="'adamw_8bit' falls back to 'adamw_torch'.*CUDA only"):
        assert grpo_config(optim="adamw_8bit").optim == "adamw_torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert grpo_config(optim="adamw_8bit").optim == "adamw_torch"
        assert grpo_config(optim="adamw_torch_fused").optim == "adamw_torch_fused"
    assert not [w for w in caught if "falls back" in str(w.message)]
    with pytest.raises(ValueError, match="optim must be one of"):
        grpo_config(optim="adafactor")
