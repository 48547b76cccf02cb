"""The confined update's building blocks (`training.dense`, `Originals`): the record of originals, gradient masks,
weight decay redirected to the drawn entries."""

import torch

from peft_stoc.training.dense import DecayRedirect, mask_gradient
from peft_stoc.tuner.originals import Originals


def test_patch_record_merges_new_entries_in_order_and_keeps_first_values():
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(50, 40, generator=generator)
    patch = Originals()
    expected: dict[int, float] = {}
    for _ in range(12):
        index = torch.randperm(2000, generator=generator)[:150].sort().values
        for i in index.tolist():
            expected.setdefault(i, float(param.view(-1)[i]))
        patch.record("w", param, index)
        param.view(-1)[index] += 1.0  # later changes must not overwrite the remembered originals
    keys = sorted(expected)
    assert patch.index["w"].tolist() == keys
    assert patch.original["w"].tolist() == [expected[i] for i in keys]


def test_recording_the_same_indices_again_is_known_only_while_neither_changed(monkeypatch):
    """A step that reuses its mask records the same index tensor again: no search while that tensor and the record
    are unchanged; a record cleared, replaced or written in place, or indices edited in place, are recorded anew."""
    param = torch.arange(100.0)
    patch = Originals()
    index = torch.tensor([3, 10, 42])
    patch.record("w", param, index)
    searched = []
    monkeypatch.setattr(patch, "_record", lambda *args: searched.append(args) or Originals._record(patch, *args))
    patch.record("w", param, index)
    assert searched == []
    index[0] = 4  # the indices edited in place
    patch.record("w", param, index)
    assert len(searched) == 1 and patch.index["w"].tolist() == [3, 4, 10, 42]
    patch.restore({"w": param})  # the record cleared: the same indices are recorded from the current values
    param += 1000
    patch.record("w", param, index)
    assert len(searched) == 2 and patch.original["w"].tolist() == [1004.0, 1010.0, 1042.0]
    patch.index["w"][0] = 5  # the record written in place
    patch.record("w", param, index)
    assert len(searched) == 3


def test_mask_gradient_keeps_only_drawn_entries():
    param = torch.nn.Parameter(torch.randn(6, 5))
    param.grad = torch.randn(6, 5)
    before = param.grad.clone().view(-1)
    drawn = torch.tensor([0, 7, 29])
    mask_gradient(param, drawn)
    expected = torch.zeros(30)
    expected[drawn] = before[drawn]
    assert torch.equal(param.grad.view(-1), expected)


def test_decay_redirect_scales_only_drawn_entries():
    param = torch.nn.Parameter(torch.ones(10))
    param.grad = torch.zeros(10)
    optimizer = torch.optim.AdamW([param], lr=0.5, weight_decay=0.2)
    redirect = DecayRedirect()
    redirect.apply(optimizer, {id(param): torch.tensor([2, 5])})
    expected = torch.ones(10)
    expected[[2, 5]] = 1 - 0.5 * 0.2
    assert torch.allclose(param.detach(), expected)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    redirect.restore()
    assert optimizer.param_groups[0]["weight_decay"] == 0.2
