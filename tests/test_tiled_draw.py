"""A tensor fed to the streaming draw a few rows at a time (how a quantized weight's gradient arrives) is drawn
from exactly as when its whole gradient arrives at once: the same entries and gradient values, for every method,
under a budget and with a fixed mask."""

import pytest
import torch

from peft_stoc.sampling.streaming import StreamingDraw


def _tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(96, 1024), (40, 64), (64,), (300, 256)]  # large (streamed), small (packed), a vector, large
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    means = [[(torch.rand(s[-1], generator=generator), 1)] if len(s) == 2 else [(None, 0)] for s in shapes]
    return params, grads, means


def _draw(method: str, tiled: bool, rows: int, changed=None, max_new=None, fixed=None):
    params, grads, means = _tensors()
    stream = StreamingDraw(
        params, 700, method, torch.Generator().manual_seed(7), fixed=fixed, changed=changed, max_new=max_new
    )
    for tensor_id in (1, 0, 2, 3):
        param, grad, mean = params[tensor_id], grads[tensor_id], means[tensor_id]
        if tiled and tensor_id in (0, 3):
            stand_in = torch.zeros(()).expand(param.shape)  # what the draw holds of a quantized weight
            stream.sources[tensor_id].param = stand_in
            for first in range(0, param.shape[0], rows):
                stream.add(tensor_id, grad[first : first + rows].clone(), mean, param[first : first + rows], first)
        else:
            stream.add(tensor_id, grad, mean)
    return stream.finish()


@pytest.mark.parametrize("method", ["top", "stochastic", "random"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_tiles_draw_what_the_whole_gradient_draws(method, rows):
    whole = _draw(method, tiled=False, rows=rows)
    tiled = _draw(method, tiled=True, rows=rows)
    assert sum(i.numel() for i in whole[0]) == 700
    for (a, av), (b, bv) in zip(zip(*whole), zip(*tiled)):
        assert torch.equal(a, b) and torch.equal(av, bv)


@pytest.mark.parametrize("method", ["top", "stochastic", "random"])
def test_tiles_under_a_budget_and_with_a_fixed_mask(method):
    generator = torch.Generator().manual_seed(3)
    changed = [torch.randperm(p.numel(), generator=generator)[:500].sort().values for p in _tensors()[0]]
    whole = _draw(method, tiled=False, rows=5, changed=changed, max_new=300)
    tiled = _draw(method, tiled=True, rows=5, changed=changed, max_new=300)
    for (a, av), (b, bv) in zip(zip(*whole), zip(*tiled)):
        assert torch.equal(a, b) and torch.equal(av, bv)
    fixed = whole[0]
    again = _draw(method, tiled=True, rows=11, fixed=fixed)
    for index, values, mask, grad in zip(again[0], again[1], fixed, _tensors()[1]):
        assert torch.equal(index, mask) and torch.equal(values, grad.reshape(-1)[index])
