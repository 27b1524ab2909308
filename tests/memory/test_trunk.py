"""The shared frozen trunk: reference and critic on the policy's trunk pass, frozen layers out of the
backward and the optimizer, TR-DPO sync of the reference's own layers, parameter bytes, LoRA reference,
activation checkpointing with a frozen trunk. Tiny random Qwen2 / Llama built from configs, fp32, CPU.
"""

import copy

import pytest
import torch
from fastppo.kernels import linear_token_logprobs

from fastppo.adapters import adapters_disabled
from fastppo.critic import TrunkValueModel, ValueHead
from fastppo.memory.accounting import unique_parameter_bytes
from fastppo.memory.activation_checkpointing import enable_gradient_checkpointing
from fastppo.memory.trunk import freeze_trunk, policy_top, run_top, run_trunk
from fastppo.optim import create_optimizer
from fastppo.reference import SharedTrunkReference

LAYERS = 4
VOCAB = 101
# The split reruns the very ops of the model's forward: the trunk + top equals it bit for bit. The
# reference against a deep copy goes through linear_token_logprobs (chunked fp32 log-softmax) vs
# torch.log_softmax of full logits: fp32 rounding only.
LOGP_TOL = dict(rtol=0.0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    """``tiny_lm(arch, tied)``: a ``LAYERS``-layer model of vocabulary ``VOCAB``, lm_head tied or not."""
    return lambda arch, tied: tiny_model(
        arch, num_hidden_layers=LAYERS, vocab_size=VOCAB, tie_word_embeddings=tied
    )


def batch(rows: int = 3, length: int = 9, seed: int = 0):
    """Left-padded prompts + right-padded completions, positions counting attended tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    mask[2, :1] = 0
    mask[2, -1:] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    labels = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)  # next token, ignored at padding
    return ids, mask, positions, labels


def full_logprobs(model, ids, mask, positions, labels):
    """Textbook log-probs of ``labels`` from the model's own forward (the oracle)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(labels == -100, 0.0)


def head_logprobs(hidden, head, labels):
    return linear_token_logprobs(hidden[:, :-1], head.weight, labels).masked_fill(labels == -100, 0.0)


def train_steps(policy, steps: int = 3, lr: float = 5e-2):
    """Move the policy away from its initial weights (so a reference reusing them would show)."""
    opt = create_optimizer(policy, "adamw_torch", lr=lr)
    ids, mask, positions, labels = batch(seed=1)
    for _ in range(steps):
        loss = -full_logprobs(policy, ids, mask, positions, labels).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


ARCHS = [("qwen2", False), ("qwen2", True), ("llama", True)]
ARCH_IDS = ["qwen2-untied", "qwen2-tied", "llama-tied"]


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("k", [0, 2, LAYERS])
def test_trunk_then_top_is_the_models_forward(arch, tied, k, tiny_lm):
    model = tiny_lm(arch, tied)
    ids, mask, positions, _ = batch()
    expected = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    trunk = run_trunk(model, ids, num_layers=k, attention_mask=mask, position_ids=positions)
    assert torch.equal(policy_top(model, trunk), expected)


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("k", [0, 2, LAYERS - 1])
def test_reference_equals_deep_copied_reference(arch, tied, k, tiny_lm):
    policy = tiny_lm(arch, tied)
    frozen_copy = copy.deepcopy(policy).eval().requires_grad_(False)
    freeze_trunk(policy, k)
    reference = SharedTrunkReference(policy, k)
    train_steps(policy)

    ids, mask, positions, labels = batch()
    expected = full_logprobs(frozen_copy, ids, mask, positions, labels)
    with torch.no_grad():
        trunk = run_trunk(policy, ids, num_layers=k, attention_mask=mask, position_ids=positions)
        got = head_logprobs(reference.top(trunk), reference.head, labels)
        policy_logp = head_logprobs(policy_top(policy, trunk), policy.lm_head, labels)
    # the policy did move: a reference that read the policy's top layers would fail here
    assert (policy_logp - expected).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, **LOGP_TOL)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
def test_frozen_trunk_gets_no_grad_and_no_optimizer_state(arch, tied, tiny_lm):
    k = 2
    policy = tiny_lm(arch, tied)
    frozen = freeze_trunk(policy, k)
    opt = train_steps(policy, steps=1)
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert not in_optimizer & {id(p) for p in frozen}
    assert set(opt.state) and all(p.requires_grad for p in opt.state)
    ids, mask, positions, labels = batch()
    full_logprobs(policy, ids, mask, positions, labels).sum().backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    # a tied lm_head is the frozen embedding: it cannot train
    assert policy.lm_head.weight.requires_grad == (not tied)


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("llama", True)], ids=["qwen2-untied", "llama-tied"])
def test_sync_mixes_only_the_reference_own_layers(arch, tied, tiny_lm):
    k = 2
    policy = tiny_lm(arch, tied)
    freeze_trunk(policy, k)
    reference = SharedTrunkReference(policy, k)
    train_steps(policy)
    before = [p.detach().clone() for p in reference.parameters()]
    trunk_before = [p.detach().clone() for p in policy.model.layers[:k].parameters()]
    alpha = 0.3
    reference.sync(policy, alpha)
    sources = [*policy.model.layers[k:].parameters(), *policy.model.norm.parameters()]
    if not tied:
        sources += list(policy.lm_head.parameters())
    assert len(sources) == len(before)
    for ref_param, old, src in zip(reference.parameters(), before, sources, strict=True):
        torch.testing.assert_close(ref_param, alpha * src + (1 - alpha) * old, rtol=1e-6, atol=1e-6)
    for param, old in zip(policy.model.layers[:k].parameters(), trunk_before, strict=True):
        assert torch.equal(param, old)
    assert all(not p.requires_grad for p in reference.parameters())
    # alpha = 1: the reference becomes the policy
    reference.sync(policy, 1.0)
    ids, mask, positions, labels = batch()
    with torch.no_grad():
        trunk = run_trunk(policy, ids, num_layers=k, attention_mask=mask, position_ids=positions)
        got = head_logprobs(reference.top(trunk), reference.head, labels)
        want = head_logprobs(policy_top(policy, trunk), policy.lm_head, labels)
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("k", [0, 3, LAYERS])
def test_parameter_bytes_match_the_formula(arch, tied, k, tiny_lm):
    policy = tiny_lm(arch, tied)
    policy_bytes = sum(p.numel() * 4 for p in policy.parameters())  # .parameters() yields a tied tensor once
    assert unique_parameter_bytes(policy) == policy_bytes
    assert unique_parameter_bytes(policy, copy.deepcopy(policy)) == 2 * policy_bytes
    layer_bytes = sum(p.numel() * 4 for p in policy.model.layers[0].parameters())
    norm_bytes = policy.config.hidden_size * 4
    head_bytes = 0 if tied else VOCAB * policy.config.hidden_size * 4
    freeze_trunk(policy, k)
    reference = SharedTrunkReference(policy, k)
    expected = policy_bytes + (LAYERS - k) * layer_bytes + norm_bytes + head_bytes
    assert unique_parameter_bytes(policy, reference) == expected
    assert (reference.lm_head is None) == tied


def test_accounting_on_meta_device_needs_no_memory(tiny_lm):
    """The benchmark accounts 7B-shaped models without allocating them."""
    with torch.device("meta"):
        policy = tiny_lm("qwen2", tied=True)
    freeze_trunk(policy, 1)
    reference = SharedTrunkReference(policy, 1)
    layer = sum(p.numel() for p in policy.model.layers[0].parameters())
    total = sum(p.numel() for p in policy.parameters())
    assert unique_parameter_bytes(policy, reference) == 4 * (total + 3 * layer + 32)


def test_critic_on_the_shared_trunk(tiny_lm):
    k = 2
    policy = tiny_lm("qwen2", tied=False)
    freeze_trunk(policy, k)
    critic = TrunkValueModel(policy, k)
    ids, mask, positions, _ = batch()
    trunk = run_trunk(policy, ids, num_layers=k, attention_mask=mask, position_ids=positions)
    values = critic(trunk)
    assert values.shape == ids.shape and values.dtype == torch.float32
    # the critic's own top starts as a copy of the policy's: same hidden states, separate weights
    assert torch.equal(run_top(trunk, critic.layers, critic.norm), policy_top(policy, trunk))
    opt = create_optimizer([policy, critic], "adamw_torch", lr=1e-3)
    owned = {id(p) for p in critic.parameters()}
    assert owned <= {id(p) for group in opt.param_groups for p in group["params"]}
    assert not owned & {id(p) for p in policy.parameters()}
    (values * mask).sum().backward()
    assert all(p.grad is not None for p in critic.parameters())
    assert all(p.grad is None for p in policy.parameters())  # the value loss never reaches the policy


def test_value_head_on_the_policy_top_trains_the_policy_top(tiny_lm):
    k = 2
    policy = tiny_lm("llama", tied=True)
    freeze_trunk(policy, k)
    head = ValueHead(policy.config.hidden_size)
    ids, mask, positions, _ = batch()
    trunk = run_trunk(policy, ids, num_layers=k, attention_mask=mask, position_ids=positions)
    values = head(policy_top(policy, trunk))
    assert values.shape == ids.shape
    values.sum().backward()
    assert all(p.grad is not None for p in policy.model.layers[k:].parameters())
    assert all(p.grad is None for p in policy.model.layers[:k].parameters())


def test_sharing_needs_a_frozen_trunk_and_a_matching_trunk(tiny_lm):
    policy = tiny_lm("qwen2", tied=False)
    with pytest.raises(ValueError, match="freeze_trunk"):
        SharedTrunkReference(policy, 2)
    with pytest.raises(ValueError, match="num_frozen_layers"):
        freeze_trunk(policy, LAYERS + 1)
    freeze_trunk(policy, 2)
    reference = SharedTrunkReference(policy, 2)
    with pytest.raises(ValueError, match="freeze_trunk"):
        TrunkValueModel(policy, 3)  # layer 2 is trainable
    ids, mask, positions, _ = batch()
    trunk = run_trunk(policy, ids, num_layers=1, attention_mask=mask, position_ids=positions)
    with pytest.raises(ValueError, match="num_layers=2"):
        reference.top(trunk)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reference.sync(policy, 1.5)


def test_lora_reference_is_the_base_model_with_zero_extra_weights(tiny_lm):
    from peft import LoraConfig, get_peft_model

    base = tiny_lm("qwen2", tied=False)
    base_copy = copy.deepcopy(base)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # non-zero B
    policy = get_peft_model(base, lora)
    ids, mask, positions, labels = batch()
    expected = full_logprobs(base_copy, ids, mask, positions, labels)
    with torch.no_grad():
        adapted = full_logprobs(policy, ids, mask, positions, labels)
        with adapters_disabled(policy):
            got = full_logprobs(policy, ids, mask, positions, labels)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters do change the policy
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)
    with pytest.raises(ValueError, match="no adapters"):
        with adapters_disabled(base_copy):
            pass


def _count_forward_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_with_a_frozen_trunk(use_reentrant, tiny_lm):
    """Same gradients as without checkpointing; non-reentrant never reruns (or backprops through)
    the frozen trunk, reentrant needs the embedding output to require grad and gets it."""
    k = 2
    plain = tiny_lm("qwen2", tied=False)
    freeze_trunk(plain, k)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed, use_reentrant=use_reentrant)
    ids, mask, positions, labels = batch()
    # hooks on a layer's first module: non-reentrant recomputation stops once the saved tensors are back
    trunk_calls = _count_forward_calls(checkpointed.model.layers[0].input_layernorm)
    top_calls = _count_forward_calls(checkpointed.model.layers[k].input_layernorm)
    for model in (plain, checkpointed):
        model.train()
        full_logprobs(model, ids, mask, positions, labels).sum().backward()
    assert top_calls[0] == 2  # recomputed in backward: checkpointing is on
    if not use_reentrant:
        assert trunk_calls[0] == 1  # the frozen trunk is neither recorded nor recomputed
    for (name, want), got in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert got.grad is None, name
