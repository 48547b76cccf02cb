"""A batch as long as it is wide (padding="max_length" with max_length equal to the batch size): μ still covers the
real tokens only, in the layout the model itself gives its activations (XLNet's are sequence-first), so μ and the
`top` draws equal a reference computed independently from every module's inputs, the mask and the gradients."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

from peft_stoc import StocTuningConfig
from peft_stoc.training.token_scopes import sequence_first_modules
from peft_stoc.tuner.candidates import UseKind

from .helpers import VOCAB, batch, tiny_model

SIZE = 4  # batch size and sequence length alike
K = 30


def _xlnet_base():
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, d_inner=24, dropout=0.0)
    return transformers.AutoModelForSequenceClassification.from_config(config)


# arch -> (base model, task, config options, names of the modules whose inputs are sequence-first)
ARCHS = {
    "bert": (lambda: tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "SEQ_CLS", {}),
    "gpt2": (
        lambda: tiny_model("gpt2", "CAUSAL_LM", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "CAUSAL_LM",
        {},
    ),
    "xlnet": (_xlnet_base, "SEQ_CLS", {"modules_to_save": ["sequence_summary", "logits_proj"]}),
}


def _square_batch(task: str, seed: int) -> dict:
    inputs = batch(task, size=SIZE, length=SIZE, seed=seed, pad_from=None)
    mask = inputs["attention_mask"]
    mask[1, 2:] = 0  # rows of 4, 2, 3 and 4 real tokens
    mask[2, 3:] = 0
    inputs["input_ids"][mask == 0] = 0  # [PAD]
    if task == "CAUSAL_LM":
        inputs["labels"] = inputs["input_ids"].masked_fill(mask == 0, -100)
    return inputs


class _Inputs:
    """Every input of the traced modules during one training forward, by module."""

    def __init__(self, modules):
        self.seen = {id(m): [] for m in modules}
        self.handles = [
            m.register_forward_hook(self._record(id(m)), with_kwargs=True) for m in modules if id(m) in self.seen
        ]

    def _record(self, key):
        def hook(module, args, kwargs, output):
            if torch.is_grad_enabled():
                value = args[0] if args else next(iter(kwargs.values()))
                self.seen[key].append(value.detach().clone())

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _reference_mean(module, kind, values: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """μ from first principles: the mean over real tokens of what enters each connection."""
    total, tokens = 0.0, 0.0
    for x in values:
        if kind is UseKind.EMBEDDING_ROW:
            ids = x.expand(mask.shape)  # positions come as (1, seq): one row per position of every sequence
            total = total + torch.bincount(ids[mask.bool()], minlength=module.num_embeddings).float()
            tokens += float(mask.sum())
            continue
        # Values not laid out by token (the pooler reads one vector per sequence) count every row.
        real = mask if x.shape[:-1] == mask.shape else torch.ones(x.shape[:-1], dtype=mask.dtype)
        if kind is UseKind.NORM_GAIN:
            if isinstance(module, torch.nn.LayerNorm):
                x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            else:
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        total = total + x[real.bool()].sum(0)
        tokens += float(real.sum())
    return total / tokens


def _reference_importance(engine, inputs: _Inputs, layouts: dict[int, bool], mask: torch.Tensor):
    """Per candidate: (μ factors, |μ ⊙ θ ⊙ g|)."""
    out = []
    for candidate in engine.candidates:
        mu = torch.zeros(())
        factors = []
        for use in candidate.uses:
            if use.kind is UseKind.CONSTANT or not use.traced:
                mu, factor = mu + 1.0, None
            else:
                module_mask = mask.t() if layouts[id(use.module)] else mask
                factor = _reference_mean(use.module, use.kind, inputs.seen[id(use.module)], module_mask)
                along_rows = use.kind is not UseKind.LINEAR_INPUT or isinstance(use.module, Conv1D)
                mu = mu + (factor.unsqueeze(1) if along_rows and candidate.param.dim() == 2 else factor)
            factors.append(factor)
        grad = candidate.param.grad
        grad = torch.zeros_like(candidate.param) if grad is None else grad  # unused this step (XLNet's mask_emb)
        importance = (mu * candidate.param.detach() * grad).abs()
        out.append((factors, importance))
    return out


def _reference_top(importances: list[torch.Tensor], k: int) -> set[tuple[int, int]]:
    flat = torch.cat([i.reshape(-1) for i in importances])
    offsets = torch.tensor([0] + [i.numel() for i in importances]).cumsum(0)
    chosen = flat.topk(k).indices
    which = torch.searchsorted(offsets, chosen, right=True) - 1
    return {(int(t), int(i - offsets[t])) for t, i in zip(which, chosen)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_square_batches_take_the_models_layout(arch):
    build, task, options = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # XLNet's relative attention is untraced: μ = 1, with a warning
        model = get_peft_model(
            build(), StocTuningConfig(k=K, task_type=task, selection="top", memory="dense", **options)
        )
    model.train()
    engine = model.base_model.stoc_engine()
    root = model.base_model.model
    traced = {id(u.module): u.module for c in engine.candidates for u in c.uses if u.traced}
    sequence_first = {id(m) for name, m in root.named_modules() if arch == "xlnet" and name.startswith("transformer.")}
    layouts = {key: key in sequence_first for key in traced}
    assert (arch == "xlnet") == any(layouts.values())
    assert sequence_first_modules(root) >= {key for key in traced if layouts[key]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        inputs = _square_batch(task, seed=step)
        seen = _Inputs(traced.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**inputs).loss.backward()
            seen.remove()
            reference = _reference_importance(engine, seen, layouts, inputs["attention_mask"])
            tracked = [engine.tracker.means(c) for c in engine.candidates]
        for candidate, (factors, _), means in zip(engine.candidates, reference, tracked):
            for expected, (mu, _) in zip(factors, means):
                if expected is None:
                    assert mu is None, candidate.name
                else:
                    torch.testing.assert_close(mu, expected, rtol=1e-5, atol=1e-6, msg=candidate.name)
        word_rows = next(m for c, m in zip(engine.candidates, tracked) if "word_embedding" in c.name or "wte" in c.name)
        assert float(next(mu for mu, dim in word_rows if dim == 0)[0]) == 0.0  # [PAD] is not a real token
        expected_draw = _reference_top([importance for _, importance in reference], K)
        optimizer.step()
        optimizer.zero_grad()
        drawn = {(t, int(i)) for t, index in enumerate(engine.last_draw) for i in index}
        assert drawn == expected_draw, step
