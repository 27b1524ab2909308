"""Padding-free batches: packing itself, no attention across packed sequences, and log-probs, loss and
gradients of a packed batch equal to those of the padded batch (tiny Qwen2 / Llama, fp32, CPU)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from fastppo.kernels import linear_token_logprobs
from transformers import AttentionInterface

from fastppo.memory import packing
from fastppo.memory.packing import (
    VARLEN_ATTENTION,
    pack,
    packed_attention_reference,
    pick_attn_implementation,
    register_varlen_attention,
    unpack,
)
from fastppo.memory.trunk import freeze_trunk, policy_top, run_trunk
from fastppo.modeling import load_causal_lm
from fastppo.reference import SharedTrunkReference

VOCAB = 97
# Packed and padded forwards differ only in which zeros the attention sums (padding keys are masked
# out with -inf vs absent) and in matmul shapes: fp32 rounding. NaN never passes assert_close.
LOGP_TOL = dict(rtol=0.0, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    """``tiny_lm(arch, attn, **config)``: a 3-layer model of vocabulary ``VOCAB`` with attention
    ``attn``, in train mode."""
    return lambda arch, attn, **config: tiny_model(
        arch, num_hidden_layers=3, vocab_size=VOCAB, attn_implementation=attn, **config
    ).train()


def rollout_batch(seed: int = 0):
    """Left-padded prompts + right-padded completions (as the sampler returns them), ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 11), generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[0, :4] = 0
    mask[0, -3:] = 0
    mask[1, :1] = 0
    mask[2, -5:] = 0  # row 3: no padding at all
    return ids, mask


def padded_inputs(ids, mask):
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def next_token_logprobs(model, hidden, ids, mask):
    """``[B, L-1]`` log-probs of each next token from ``[B, L, H]`` hidden states (the fused scorer), 0
    where the next token is padding."""
    labels = torch.where(mask[:, 1:].bool() & mask[:, :-1].bool(), ids[:, 1:], -100)
    logp = linear_token_logprobs(hidden[:, :-1], model.lm_head.weight, labels)
    return logp.masked_fill(labels == -100, 0.0), labels != -100


def loss_and_grads(model, logp, valid, weights):
    loss = -(logp * weights * valid).sum() / valid.sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


def test_pack_by_hand():
    ids = torch.tensor([[5, 6, 7], [8, 9, 4]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    packed = pack(ids, mask)
    assert packed.input_ids.tolist() == [[6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 0, 1]]
    assert packed.cu_seqlens.tolist() == [0, 2, 4] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 2 and packed.index.tolist() == [1, 2, 3, 4]
    assert unpack(packed.input_ids, packed, fill=-1).tolist() == [[-1, 6, 7], [8, 9, -1]]
    values = torch.randn(4, 3, requires_grad=True)
    unpack(values, packed).sum().backward()  # differentiable
    assert torch.equal(values.grad, torch.ones(4, 3))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"must both be \[B, L\]"):
        pack(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="row 1 .* no attended token"):
        pack(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    packed = pack(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="hold 5 tokens, the packed batch 6"):
        unpack(torch.zeros(5), packed)


def test_reference_attention_is_block_diagonal_causal():
    """Against a dense float64 SDPA with the block-diagonal causal mask built by hand, with GQA and
    awkward lengths; then no token may see another sequence: changing sequence 0's keys and values
    leaves every other sequence's output unchanged, bit for bit."""
    cu = torch.tensor([0, 1, 5, 12], dtype=torch.int32)
    n, hq, hk, d = 12, 6, 2, 8
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hk, d), torch.randn(n, hk, d)
    seq = torch.repeat_interleave(torch.arange(3), cu.diff().long())
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    dense = F.scaled_dot_product_attention(
        q.double().transpose(0, 1),
        k.double().repeat_interleave(3, dim=1).transpose(0, 1),
        v.double().repeat_interleave(3, dim=1).transpose(0, 1),
        attn_mask=allowed,
    ).transpose(0, 1)
    out = packed_attention_reference(q, k, v, cu)
    torch.testing.assert_close(out.double(), dense, rtol=0.0, atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    k2[:1], v2[:1] = torch.randn(1, hk, d), torch.randn(1, hk, d)
    out2 = packed_attention_reference(q, k2, v2, cu)
    assert torch.equal(out2[1:], out[1:]) and not torch.equal(out2[:1], out[:1])


def test_sequence_boundaries_from_positions(tiny_lm):
    """Without the packed batch's cu_seqlens the attention finds sequences where positions restart."""
    cu, longest = packing.sequence_boundaries(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1, 6, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5, 6] and longest == 3
    cu, longest = packing.sequence_boundaries(torch.arange(4)[None], 2, 4, torch.device("cpu"))  # rows
    assert cu.tolist() == [0, 4, 8] and longest == 4
    model = tiny_lm("llama", register_varlen_attention()).eval()
    packed = pack(*rollout_batch())
    with torch.no_grad():
        want = model(**packed.model_inputs()).logits
        got = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


# Qwen2 with sliding-window layers 1 and 2 (window 4 < the longest sequence, 10 tokens), as Mistral
# or Phi-3 have: each token sees only the 3 before it there.
SLIDING = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)


@pytest.mark.parametrize(
    ("arch", "config"), [("qwen2", {}), ("llama", {}), ("qwen2", SLIDING)], ids=["qwen2", "llama", "sliding"]
)
@pytest.mark.parametrize("attn", [VARLEN_ATTENTION, "sdpa"], ids=["varlen-reference", "sdpa-packed-mask"])
def test_packed_matches_padded(arch, config, attn, tiny_lm):
    """Log-probs, loss and every gradient of a packed batch equal the padded batch's (padded: SDPA)."""
    register_varlen_attention()
    padded_model = tiny_lm(arch, "sdpa", **config)
    packed_model = copy.deepcopy(padded_model)
    packed_model.set_attn_implementation(attn)
    ids, mask = rollout_batch()
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1)  # a random upstream gradient, not .sum()

    hidden = padded_model.model(**padded_inputs(ids, mask), use_cache=False).last_hidden_state
    want_logp, valid = next_token_logprobs(padded_model, hidden, ids, mask)
    want_loss, want_grads = loss_and_grads(padded_model, want_logp, valid, weights)

    packed = pack(ids, mask)
    packed_hidden = packed_model.model(**packed.model_inputs()).last_hidden_state  # [1, N, H]
    assert packed_hidden.shape[1] == int(mask.sum())  # no padding computed
    got_logp, _ = next_token_logprobs(packed_model, unpack(packed_hidden, packed), ids, mask)
    got_loss, got_grads = loss_and_grads(packed_model, got_logp, valid, weights)

    torch.testing.assert_close(got_logp, want_logp, **LOGP_TOL)
    torch.testing.assert_close(got_loss, want_loss, **LOGP_TOL)
    names = [name for name, p in padded_model.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOL, msg=name)


def test_packed_sequences_do_not_see_each_other(tiny_lm):
    model = tiny_lm("qwen2", register_varlen_attention()).eval()
    ids, mask = rollout_batch()
    changed = ids.clone()
    changed[0] = (changed[0] + 1) % VOCAB  # another first sequence
    with torch.no_grad():
        out = model.model(**pack(ids, mask).model_inputs()).last_hidden_state[0]
        out2 = model.model(**pack(changed, mask).model_inputs()).last_hidden_state[0]
    first = int(mask[0].sum())
    assert torch.equal(out2[first:], out[first:]) and not torch.allclose(out2[:first], out[:first])


def test_shared_trunk_reference_on_a_packed_batch(tiny_lm):
    """The trunk pass carries the packed batch's boundaries to the reference's own layers."""
    policy = tiny_lm("llama", register_varlen_attention())
    freeze_trunk(policy, 1)
    reference = SharedTrunkReference(policy, 1)
    ids, mask = rollout_batch()
    packed = pack(ids, mask)
    with torch.no_grad():
        trunk = run_trunk(policy, num_layers=1, **packed.model_inputs())
        padded_trunk = run_trunk(policy, num_layers=1, **padded_inputs(ids, mask))
        got = unpack(reference.top(trunk), packed)
        want = reference.top(padded_trunk) * mask[..., None]
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-5)
        torch.testing.assert_close(unpack(policy_top(policy, trunk), packed), got, rtol=0, atol=0)


def test_varlen_attention_serves_padded_batches_and_generation_like_sdpa(tiny_lm):
    """Calls that are not packed go to SDPA with SDPA's own mask: one model samples and trains."""
    sdpa_model = tiny_lm("qwen2", "sdpa").eval()
    varlen_model = copy.deepcopy(sdpa_model)
    varlen_model.set_attn_implementation(register_varlen_attention())
    ids, mask = rollout_batch()
    with torch.no_grad():
        want = sdpa_model(**padded_inputs(ids, mask)).logits
        got = varlen_model(**padded_inputs(ids, mask)).logits
    torch.testing.assert_close(got * mask[..., None], want * mask[..., None], rtol=0.0, atol=1e-6)
    prompt, prompt_mask = ids[:, :5], mask[:, :5].clone()
    prompt_mask[:, -1] = 1
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want_tokens = sdpa_model.generate(input_ids=prompt, attention_mask=prompt_mask, **settings)
    got_tokens = varlen_model.generate(input_ids=prompt, attention_mask=prompt_mask, **settings)
    assert torch.equal(got_tokens, want_tokens)


def test_default_attention_and_model_init_kwargs(model_dir):
    assert load_causal_lm(model_dir, None, False).config._attn_implementation == "sdpa"  # CPU default
    eager = load_causal_lm(model_dir, {"attn_implementation": "eager"}, False)
    assert eager.config._attn_implementation == "eager"
    varlen = load_causal_lm(model_dir, {"attn_implementation": VARLEN_ATTENTION}, False)
    assert varlen.config._attn_implementation == VARLEN_ATTENTION


def test_pick_attn_implementation(monkeypatch):
    assert pick_attn_implementation(padding_free=True, device="cpu") == "sdpa"
    assert pick_attn_implementation(padding_free=False, device="cpu") == "sdpa"
    monkeypatch.setattr(packing, "flash_attn_available", lambda: False)
    monkeypatch.setattr(packing, "varlen_available", lambda: True)
    assert pick_attn_implementation(padding_free=False, device="cuda") == "sdpa"
    assert pick_attn_implementation(padding_free=True, device="cuda") == VARLEN_ATTENTION
    assert VARLEN_ATTENTION in AttentionInterface._global_mapping
    monkeypatch.setattr(packing, "flash_attn_available", lambda: True)
    assert pick_attn_implementation(padding_free=True, device="cuda") == "flash_attention_2"


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 16])
def test_torch_varlen_matches_the_reference_on_cuda(window):
    if window is not None and not packing.varlen_takes_window():
        pytest.skip("this torch's varlen_attn has no window_size")
    cu = torch.tensor([0, 3, 64, 200], dtype=torch.int32, device="cuda")
    q = torch.randn(200, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 200, 2, 64, device="cuda", dtype=torch.bfloat16)
    exact = packed_attention_reference(q.double(), k.double(), v.double(), cu, window=window)
    low = packed_attention_reference(q, k, v, cu, window=window)
    got = packing._torch_varlen(q, k, v, cu, 136, None, window)
    # the kernel's error within a small factor of the bf16 reference's own error
    assert (got.double() - exact).abs().max() <= 2 * (low.double() - exact).abs().max() + 1e-3


@pytest.mark.gpu
def test_packed_matches_padded_on_cuda_through_varlen_attn(monkeypatch, tiny_lm):
    """fp32 weights under bf16 autocast (the trainers' default): RoPE leaves q, k fp32 and v bf16,
    and the packed forward must still reach varlen_attn, not the per-sequence reference."""
    if not packing.varlen_available():
        pytest.skip("this torch has no varlen_attn")
    calls = []
    monkeypatch.setattr(
        packing, "_torch_varlen", lambda *a, f=packing._torch_varlen: calls.append(1) or f(*a)
    )
    model = tiny_lm("qwen2", "sdpa").cuda()
    packed_model = copy.deepcopy(model)
    packed_model.set_attn_implementation(register_varlen_attention())
    ids, mask = (t.cuda() for t in rollout_batch())
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        want = model.model(**padded_inputs(ids, mask), use_cache=False).last_hidden_state
        packed = pack(ids, mask)
        got = unpack(packed_model.model(**packed.model_inputs()).last_hidden_state, packed)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(
        got.float() * mask[..., None], want.float() * mask[..., None], rtol=0.0, atol=5e-2
    )
