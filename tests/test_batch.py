"""PolicyBatch: the rows of a rollout a forward reads, trimmed to what they attend to."""

from __future__ import annotations

import torch

from fastppo.batch import PolicyBatch
from fastppo.rollout import completion_mask, left_pad

EOS, PAD = 1, 0


def test_policy_batch_select_trims_padding_columns():
    prompt_ids, prompt_mask = left_pad([[4, 5, 6], [7], [8, 9]], PAD)
    completion_ids = torch.tensor([[5, 1, 0, 0], [6, 6, 6, 1], [7, 1, 0, 0]])
    cmask, _ = completion_mask(completion_ids, [EOS])
    batch = PolicyBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        cmask,
        cmask.clone(),
        torch.arange(3),
        advantages=torch.tensor([1.0, 2.0, 3.0]),
    )
    picked = batch.select(torch.tensor([2, 1]))
    assert picked.prompt_ids.tolist() == [[8, 9], [0, 7]]  # leading all-pad column dropped
    assert picked.completion_ids.shape == (2, 4) and picked.advantages.tolist() == [3.0, 2.0]
    picked = batch.select(torch.tensor([0, 2]))
    assert picked.completion_ids.tolist() == [[5, 1], [7, 1]]  # trailing all-masked columns dropped
    assert picked.rows.tolist() == [0, 2]
    parts = batch.split(2, torch.Generator().manual_seed(0))
    assert sorted(r for p in parts for r in p.rows.tolist()) == [0, 1, 2]
