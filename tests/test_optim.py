"""Optimizer choice (8-bit on CUDA, torch AdamW otherwise with one warning; resolved when a config is
built), transformers' optimizer names and optim_args through its own factory (and a GRPO run that
trains with SGD and Adafactor), trainable-only state, and the byte formulas the memory benchmark
reports (``memory.accounting``), checked against the state optimizers really hold."""

import types
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
from fastppo.optim import (
    build_optimizer,
    create_optimizer,
    default_optim_name,
    optimizer_from_config,
    parameter_groups,
)


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
    with pytest.raises(
        ValueError, match="optim must be one of transformers' OptimizerNames .*'sgd'.*got 'sgdd'"
    ):
        create_optimizer(Block(), "sgdd", lr=1e-3)
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
    opt = build_optimizer(parameter_groups(model, 0.0), name, lr=1e-3)  # no CUDA-only check
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
    assert grpo_config(optim="adafactor", optim_args="beta1=0.9").optim == "adafactor"
    with pytest.raises(ValueError, match="optim must be one of"):
        grpo_config(optim="adam")


def changed_after_a_step(opt: torch.optim.Optimizer, model: nn.Module) -> bool:
    before = [p.detach().clone() for p in model.parameters()]
    step_once(opt, model)
    return all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "name, cls",
    [
        ("sgd", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("rmsprop", torch.optim.RMSprop),
        ("adamw_torch_fused", torch.optim.AdamW),
        ("adafactor", None),  # transformers.optimization.Adafactor
    ],
)
def test_transformers_optimizer_names_build_through_its_factory_and_step(name, cls):
    from transformers.optimization import Adafactor

    model = Block()
    opt = create_optimizer(model, name, lr=1e-2, weight_decay=0.1)
    assert type(opt) is (cls or Adafactor)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # fastppo's groups kept
    assert changed_after_a_step(opt, model)
    if name == "adafactor":  # transformers' settings for a fixed learning rate
        assert opt.defaults["lr"] == 1e-2 and not opt.defaults["relative_step"]


def test_optim_args_reach_the_optimizer():
    opt = create_optimizer(Block(), "sgd", lr=0.1, optim_args="momentum=0.9, nesterov=True")
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    opt = create_optimizer(Block(), "rmsprop", lr=0.1, optim_args="alpha=0.5,centered=true")
    assert opt.defaults["alpha"] == 0.5 and opt.defaults["centered"] is True


def test_optimizers_that_cannot_run_or_be_driven_are_clear_errors(grpo_config):
    # another bitsandbytes optimizer on CPU: no documented fallback (Lion is not AdamW)
    with pytest.raises(ValueError, match="optim='lion_8bit' cannot run here: .*CUDA only"):
        create_optimizer(Block(), "lion_8bit", lr=1e-3)
    with pytest.raises(ValueError, match="optim='paged_adamw_32bit' cannot run here"):
        grpo_config(optim="paged_adamw_32bit")  # when the config is built
    with pytest.raises(ValueError, match="optim='grokadamw' cannot be built here: .*install grokadamw"):
        grpo_config(optim="grokadamw")  # its package is not installed here
    with pytest.raises(ValueError, match="optim='sgd' cannot be built here"):
        grpo_config(optim="sgd", optim_args="momentum")  # not key=value
    for name, reason in (("lomo", "inside backward"), ("galore_adamw", "optim_target_modules")):
        with pytest.raises(ValueError, match=f"optim={name!r} is not supported by fastppo: .*{reason}"):
            grpo_config(optim=name)


def test_sharded_runs_refuse_bitsandbytes_optimizers_without_a_fallback():
    args = types.SimpleNamespace(
        optim="lion_32bit", optim_args=None, learning_rate=1e-3, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    )  # fmt: skip
    with pytest.raises(ValueError, match="optim='lion_32bit' with fsdp: bitsandbytes does not shard"):
        optimizer_from_config(args, [Block()], sharded=True)
    optim.warn_once.cache_clear()
    with pytest.warns(UserWarning, match="'adamw_8bit' with fsdp.*adamw_torch"):
        opt = optimizer_from_config(
            types.SimpleNamespace(**{**vars(args), "optim": "adamw_8bit"}), [Block()], True
        )
    assert type(opt) is torch.optim.AdamW


@pytest.mark.parametrize("name, optim_args", [("sgd", "momentum=0.9"), ("adafactor", None)])
def test_grpo_trains_with_sgd_and_adafactor(grpo_trainer, name, optim_args):
    trainer = grpo_trainer(optim=name, optim_args=optim_args, max_steps=3, learning_rate=0.05)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    output = trainer.train()
    inner = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer around it
    assert type(inner).__name__ == {"sgd": "SGD", "adafactor": "Adafactor"}[name]
    if name == "sgd":
        assert inner.defaults["momentum"] == 0.9
    assert output.global_step == 3
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2, moved
