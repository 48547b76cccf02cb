"""The method on every supported architecture, checked against an independent reference.

For each tiny random model: μ of every candidate equals a reference computed here with plain forward hooks over the
real tokens of two micro-batches with different padding; `selection="top"` draws the reference top-k of
|μ·θ·g|; three AdamW steps change only drawn entries (and the fully trained head); the saved adapter, loaded on a
fresh base and merged, gives the trained model's logits.

`python -m tests.test_architectures` prints the "Supported models" table of docs/method.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_stoc import StocTuningConfig

from .helpers import VOCAB

BATCH = 3
ENCODER_LENGTHS = (7, 9)  # the two micro-batches: distinct from each other, from BATCH and from DECODER_LENGTHS
DECODER_LENGTHS = (5, 6)
K = 30


@dataclass
class Arch:
    """A tiny configuration, its head and task type, and what its inputs look like."""

    config: object
    head: type
    task_type: str | None
    inputs: str  # "text", "causal", "seq2seq", "image" or "speech"
    modules_to_save: list[str] | None = None
    untraced: list[str] = field(default_factory=list)  # "name (Type)" of the modules whose parameters get μ = 1
    caveat: str = ""


def _text(cls, **extra):
    return cls(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        **extra,
    )


def _decoder(cls, **extra):
    return cls(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        pad_token_id=0,
        **extra,
    )


def _archs() -> dict[str, Arch]:
    t, seq_cls = transformers, transformers.AutoModelForSequenceClassification
    causal, seq2seq = transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM
    return {
        "bert": Arch(_text(t.BertConfig), seq_cls, "SEQ_CLS", "text"),
        "roberta": Arch(_text(t.RobertaConfig, pad_token_id=1), seq_cls, "SEQ_CLS", "text"),
        "deberta-v2": Arch(
            _text(
                t.DebertaV2Config,
                relative_attention=True,
                position_buckets=8,
                norm_rel_ebd="layer_norm",
                pos_att_type=["p2c", "c2p"],
            ),
            seq_cls,
            "SEQ_CLS",
            "text",
            untraced=["deberta.encoder.rel_embeddings (Embedding)"],
            caveat="the relative-position table is read as a whole tensor, not looked up",
        ),
        "distilbert": Arch(
            t.DistilBertConfig(
                vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32
            ),
            seq_cls,
            "SEQ_CLS",
            "text",
        ),
        "albert": Arch(
            _text(t.AlbertConfig, embedding_size=8),
            seq_cls,
            "SEQ_CLS",
            "text",
            caveat="shared layers: μ covers every call of a module",
        ),
        "electra": Arch(_text(t.ElectraConfig, embedding_size=8), seq_cls, "SEQ_CLS", "text"),
        "xlm-roberta": Arch(_text(t.XLMRobertaConfig, pad_token_id=1), seq_cls, "SEQ_CLS", "text"),
        "xlnet": Arch(
            t.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=24),
            seq_cls,
            "SEQ_CLS",
            "text",
            modules_to_save=["sequence_summary", "logits_proj"],
            untraced=["transformer.layer.0.rel_attn (XLNetRelativeAttention)", "transformer (XLNetModel)"],
            caveat="sequence-first activations: the padding mask is transposed; attention weights are "
            "parameters used in einsums",
        ),
        "gpt2": Arch(
            t.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=0),
            causal,
            "CAUSAL_LM",
            "causal",
        ),
        "gpt-neox": Arch(_decoder(t.GPTNeoXConfig, rotary_pct=0.5), causal, "CAUSAL_LM", "causal"),
        "opt": Arch(
            t.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                ffn_dim=24,
                max_position_embeddings=32,
                word_embed_proj_dim=16,
                pad_token_id=1,
            ),
            causal,
            "CAUSAL_LM",
            "causal",
            caveat="learned positions are the rows really gathered (offset 2)",
        ),
        "bart": Arch(
            t.BartConfig(
                vocab_size=VOCAB,
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=24,
                decoder_ffn_dim=24,
                max_position_embeddings=32,
            ),
            seq2seq,
            "SEQ_2_SEQ_LM",
            "seq2seq",
            caveat="learned positions are the rows really gathered (offset 2); cross-attention keys and "
            "values take the encoder's padding",
        ),
        "t5": Arch(
            t.T5Config(
                vocab_size=VOCAB,
                d_model=16,
                d_kv=8,
                d_ff=24,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
            ),
            seq2seq,
            "SEQ_2_SEQ_LM",
            "seq2seq",
            caveat="`T5LayerNorm` is an RMS norm; the relative-position buckets count every (query, key) pair",
        ),
        "llama": Arch(
            _decoder(t.LlamaConfig, num_key_value_heads=1, tie_word_embeddings=True), causal, "CAUSAL_LM", "causal"
        ),
        "mistral": Arch(_decoder(t.MistralConfig, num_key_value_heads=1), causal, "CAUSAL_LM", "causal"),
        "qwen2": Arch(_decoder(t.Qwen2Config, num_key_value_heads=1), causal, "CAUSAL_LM", "causal"),
        "gemma": Arch(
            _decoder(t.GemmaConfig, num_key_value_heads=1, head_dim=8),
            causal,
            "CAUSAL_LM",
            "causal",
            caveat="norm gains scale by 1 + weight: μ is the mean normalised input all the same",
        ),
        "phi": Arch(_decoder(t.PhiConfig, partial_rotary_factor=0.5), causal, "CAUSAL_LM", "causal"),
        "vit": Arch(
            t.ViTConfig(
                image_size=8,
                patch_size=4,
                num_channels=3,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=24,
            ),
            transformers.AutoModelForImageClassification,
            None,
            "image",
            modules_to_save=["classifier"],
            untraced=["vit.embeddings (ViTEmbeddings)", "vit.embeddings.patch_embeddings.projection (Conv2d)"],
            caveat="no padding: every patch counts; `[CLS]` and the position table are additive parameters",
        ),
        "whisper": Arch(
            t.WhisperConfig(
                vocab_size=VOCAB,
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=24,
                decoder_ffn_dim=24,
                num_mel_bins=8,
                max_source_positions=10,
                max_target_positions=32,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
            ),
            transformers.AutoModelForSpeechSeq2Seq,
            None,
            "speech",
            untraced=["model.encoder.conv1 (Conv1d)", "model.encoder.conv2 (Conv1d)"],
            caveat="the encoder's sinusoidal position table, frozen by transformers, becomes a candidate: "
            'add `exclude_modules=["model.encoder.embed_positions"]` to keep it fixed',
        ),
    }


ARCHS = _archs()


# -- models and batches ------------------------------------------------------------------------------------------
def build(name: str) -> nn.Module:
    """The tiny model, with biases and norm gains moved off their initial 0 and 1 so that they matter."""
    torch.manual_seed(0)
    model = ARCHS[name].head.from_config(ARCHS[name].config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def _ids_and_mask(length: int, pad: int, left: bool, generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, length), generator=generator)
    mask = torch.ones(BATCH, length, dtype=torch.long)
    for row, real in enumerate((length, length - 2, length - 4)):  # rows with 0, 2 and 4 padding positions
        pads = slice(0, length - real) if left else slice(real, length)
        mask[row, pads] = 0
        ids[row, pads] = pad
    return ids, mask


def micro_batch(name: str, index: int) -> dict[str, torch.Tensor]:
    """Micro-batch `index` (0 or 1) of `name`: different lengths, and padding on the right then the left."""
    arch, generator = ARCHS[name], torch.Generator().manual_seed(10 + index)
    length, decoder_length = ENCODER_LENGTHS[index], DECODER_LENGTHS[index]
    pad = getattr(arch.config, "pad_token_id", None) or 0
    if arch.inputs == "image":
        return {
            "pixel_values": torch.randn(BATCH, 3, 8, 8, generator=generator),
            "labels": torch.randint(0, 2, (BATCH,), generator=generator),
        }
    if arch.inputs in ("text", "causal"):
        ids, mask = _ids_and_mask(length, pad, left=index == 1 and arch.inputs == "causal", generator=generator)
        if arch.inputs == "text":
            labels = torch.randint(0, 2, (BATCH,), generator=generator)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = {}
    if arch.inputs == "seq2seq":
        out["input_ids"], out["attention_mask"] = _ids_and_mask(length, pad, left=False, generator=generator)
    else:
        frames = 2 * arch.config.max_source_positions
        out["input_features"] = torch.randn(BATCH, arch.config.num_mel_bins, frames, generator=generator)
    decoder_ids, decoder_mask = _ids_and_mask(decoder_length, pad, left=False, generator=generator)
    out["decoder_input_ids"] = decoder_ids
    out["labels"] = decoder_ids.masked_fill(decoder_mask == 0, -100)
    if index == 1:  # the first micro-batch leaves the decoder mask out: every decoder token is real then
        out["decoder_attention_mask"] = decoder_mask
    return out


def token_masks(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The (batch, seq) masks of the token sets in `batch`; their shapes differ, so a shape names its token set."""
    masks = [batch["attention_mask"]] if "attention_mask" in batch else []
    if "decoder_input_ids" in batch:
        masks.append(batch.get("decoder_attention_mask", torch.ones_like(batch["decoder_input_ids"])))
    return masks


def make_peft(name: str, base: nn.Module, **config) -> nn.Module:
    arch = ARCHS[name]
    config = StocTuningConfig(task_type=arch.task_type, modules_to_save=arch.modules_to_save, **config)
    return get_peft_model(base, config)


# -- the reference ---------------------------------------------------------------------------------------------
class Reference:
    """μ from plain forward hooks: for each module owning a candidate, the mean of what enters its connections."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.masks: list[torch.Tensor] = []
        self.sums: dict[int, list] = {}  # id(module) -> [total, tokens]
        self.owners = {
            id(p): [m for m in model.modules() if any(q is p for q in m._parameters.values())] for p in params
        }
        modules = {id(m): m for owners in self.owners.values() for m in owners}
        self.handles = [m.register_forward_hook(self._hook) for m in modules.values()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _real(self, leading: torch.Size) -> torch.Tensor:
        """Weights (1 real, 0 padding) for values whose token dimensions are `leading`: by shape."""
        for mask in self.masks:
            if tuple(leading) == tuple(mask.shape):
                return mask.double()
            if tuple(leading) == tuple(mask.t().shape):  # sequence-first activations (XLNet)
                return mask.t().double()
            if tuple(leading) in ((mask.shape[1],), (1, mask.shape[1])):  # one row per position, for every sequence
                return mask.double().sum(0).reshape(leading)
        return torch.ones(leading, dtype=torch.float64)

    def _add(self, module: nn.Module, total: torch.Tensor, tokens: float) -> None:
        entry = self.sums.setdefault(id(module), [0.0, 0.0])
        entry[0] = entry[0] + total
        entry[1] += tokens

    @torch.no_grad()
    def _hook(self, module, args, output):
        if isinstance(module, nn.Embedding):
            self._add_rows(module, output)
        elif isinstance(module, (nn.Linear, Conv1D)):
            self._add_values(module, args[0])
        elif _is_norm(module):
            gain = module.weight + 1 if type(module).__name__.startswith("Gemma") else module.weight
            bias = getattr(module, "bias", None)
            self._add_values(module, (output - (bias if bias is not None else 0)) / gain)

    def _add_values(self, module: nn.Module, values: torch.Tensor) -> None:
        real = self._real(values.shape[:-1])
        self._add(
            module, (values.double() * real.unsqueeze(-1)).reshape(-1, values.shape[-1]).sum(0), float(real.sum())
        )

    def _add_rows(self, module: nn.Module, output: torch.Tensor) -> None:
        """Which rows the lookup gathered, read off its output: each output vector is a row of the table, possibly
        times one scale (Gemma scales inside its embedding)."""
        table = module.weight.detach().double()
        vectors = output.detach().double().reshape(-1, table.shape[1])
        norms, row_norms = vectors.norm(dim=1), table.norm(dim=1)
        unit_vectors, unit_rows = vectors / norms.clamp_min(1e-30)[:, None], table / row_norms.clamp_min(1e-30)[:, None]
        cosine, rows = (unit_vectors @ unit_rows.T).max(1)
        zero = norms == 0
        rows[zero] = row_norms.argmin()  # a padding row of zeros
        scale = norms[~zero] / row_norms[rows[~zero]]
        assert bool((cosine[~zero] > 1 - 1e-9).all()) and float(scale.max() / scale.min()) < 1 + 1e-9, (
            f"{type(module).__name__} is not a lookup"
        )
        real = self._real(output.shape[:-1]).reshape(-1)
        counts = torch.zeros(table.shape[0], dtype=torch.float64).index_add_(0, rows, real)
        self._add(module, counts, float(real.sum()))

    def mu(self, param: nn.Parameter) -> torch.Tensor:
        """μ of `param` at its full size: the sum over the modules owning it that ran (a tied embedding is also an
        output head); 1 for a parameter that got a gradient although none of them ran (used around them)."""
        owners = self.owners[id(param)]
        ran = [m for m in owners if id(m) in self.sums or getattr(m, "weight", None) is not param]
        if not ran:
            assert param.grad is not None and bool(param.grad.any())
            return torch.ones(param.shape, dtype=torch.float64)
        mu = torch.zeros(param.shape, dtype=torch.float64)
        for module in ran:
            mu += self._factor(module, param)
        return mu

    def _factor(self, module: nn.Module, param: nn.Parameter) -> torch.Tensor:
        one = torch.ones(param.shape, dtype=torch.float64)
        if (
            param is not getattr(module, "weight", None)
            or not isinstance(module, (nn.Linear, Conv1D, nn.Embedding))
            and not _is_norm(module)
        ):
            return one  # biases, and parameters of modules whose input is not traced
        total, tokens = self.sums[id(module)]
        mean = total / tokens
        if isinstance(module, nn.Linear):
            return one * mean.reshape(1, -1)
        return one * mean.reshape(-1, *[1] * (param.dim() - 1))


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None and module.weight.dim() == 1


def library_mu(engine, candidate) -> torch.Tensor:
    """The tracker's μ of `candidate`, broadcast to the parameter's full size."""
    mu = torch.zeros(candidate.param.shape, dtype=torch.float64)
    for vector, dim in engine.tracker.means(candidate):
        if vector is None:
            mu += 1
        else:
            shape = [1] * candidate.param.dim()
            shape[dim] = -1
            mu += vector.double().reshape(shape)
    return mu


# -- the matrix --------------------------------------------------------------------------------------------------
def _stoc_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "StocTuning" in str(w.message)]


def _top_k(importance: dict[str, torch.Tensor], k: int) -> tuple[set[tuple[str, int]], float]:
    names = list(importance)
    flat = torch.cat([importance[n].reshape(-1) for n in names])
    values, index = flat.topk(k)
    offsets = torch.tensor([0] + [importance[n].numel() for n in names]).cumsum(0)
    chosen = set()
    for i in index.tolist():
        tensor = int(torch.searchsorted(offsets, torch.tensor(i), right=True)) - 1
        chosen.add((names[tensor], i - int(offsets[tensor])))
    return chosen, float(values[-1])


def _drawn(engine) -> set[tuple[str, int]]:
    return {(c.name, i) for c, idx in zip(engine.candidates, engine.last_draw) for i in idx.tolist()}


def check_mu_and_top_draw(name: str, model: nn.Module) -> tuple[set[tuple[str, int]], torch.optim.Optimizer]:
    """(a) μ equals the reference over two micro-batches; (b) the top draw equals the reference top-k."""
    engine = model.base_model.stoc_engine()
    reference = Reference(model.base_model.model, [c.param for c in engine.candidates])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for index in (0, 1):
        batch = micro_batch(name, index)
        reference.masks = token_masks(batch)
        with model.base_model.stoc_accumulating():  # gradients kept dense: the reference reads them
            model(**batch).loss.backward()
    reference.remove()
    importance = {}
    for candidate in engine.candidates:
        expected, got = reference.mu(candidate.param), library_mu(engine, candidate)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (
            f"{name}: μ of {candidate.name} differs by {(got - expected).abs().max():.3g}"
        )
        grad = candidate.param.grad if candidate.param.grad is not None else torch.zeros_like(candidate.param)
        importance[candidate.name] = (expected * candidate.param.detach().double() * grad.double()).abs()
    wanted, threshold = _top_k(importance, K)
    optimizer.step()
    drawn = _drawn(engine)
    # Entries whose importance ties the k-th within rounding may be swapped; every other one must match.
    near = {
        (n, i) for n, i in wanted ^ drawn if abs(float(importance[n].reshape(-1)[i]) - threshold) <= 1e-6 * threshold
    }
    assert len(drawn) == K and wanted ^ drawn <= near, f"{name}: top draw differs from the reference top-k"
    optimizer.zero_grad()
    return drawn, optimizer


def check_confinement(name: str, model: nn.Module, optimizer, drawn: set, before: dict[str, torch.Tensor]) -> None:
    """(c) Two more AdamW steps: only entries drawn at some step (and the head) changed."""
    engine = model.base_model.stoc_engine()
    for index in (0, 1):
        model(**micro_batch(name, index)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        drawn |= _drawn(engine)
    changed = set()
    for param_name, param in model.base_model.model.named_parameters():
        if "modules_to_save" in param_name:
            continue
        diff = (param.detach() != before[param_name]).reshape(-1).nonzero().squeeze(1)
        changed |= {(param_name, i) for i in diff.tolist()}
    assert changed, f"{name}: training changed nothing"
    assert changed <= drawn, f"{name}: {len(changed - drawn)} entries changed without being drawn"


def check_save_load(name: str, model: nn.Module, directory) -> None:
    """(d) save → load on a fresh base → merge_and_unload reproduces the trained model's logits."""
    inputs = {k: v for k, v in micro_batch(name, 1).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(directory)
    loaded = PeftModel.from_pretrained(build(name), directory).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (
        f"{name}: loaded logits differ by {(got - expected).abs().max()}"
    )
    merged = loaded.merge_and_unload().eval()  # also heads without `.weight` (RobertaClassificationHead)
    with torch.no_grad():
        got = merged(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (
        f"{name}: merged logits differ by {(got - expected).abs().max()}"
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation, which costs most on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture(name, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = make_peft(name, build(name), k=K, selection="top")
        before = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters()}
        drawn, optimizer = check_mu_and_top_draw(name, model)
        check_confinement(name, model, optimizer, drawn, before)
        check_save_load(name, model, tmp_path)
    messages = _stoc_warnings(caught)
    assert len(messages) == len(set(messages)), f"{name}: a warning repeated: {messages}"
    warned = " ".join(messages)
    for module_name in ARCHS[name].untraced:
        assert module_name in warned, f"{name}: no warning names {module_name}"
    if not ARCHS[name].untraced:
        assert not messages, messages
    creation = [w for w in caught if "does not trace" in str(w.message)]
    assert all(w.filename == __file__ for w in creation), [w.filename for w in creation]


# -- the documentation table -------------------------------------------------------------------------------------
KIND_NAMES = {
    "linear_input": "linear",
    "conv1d_input": "Conv1D",
    "embedding_row": "embedding rows",
    "norm_gain": "norm gains",
    "constant": "biases",
}


def _merges(model: nn.Module) -> bool:
    try:
        model.merge_and_unload()
    except AttributeError:
        return False
    return True


def describe(name: str) -> str:
    """One row of the "Supported models" table, read off the model as this matrix builds it."""
    arch = ARCHS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_peft(name, build(name), k=K)
        engine = model.base_model.stoc_engine()
        kinds = sorted({KIND_NAMES[u.kind.value] for c in engine.candidates for u in c.uses if u.traced})
        cls = type(model.base_model.model).__name__
        merges = _merges(model)
    untraced = ", ".join(f"`{m}`" for m in arch.untraced) or "–"
    status = "yes" if merges else "yes, except `merge_and_unload` (head without `.weight`)"
    return (
        f"| {name} | `{cls}` | {arch.task_type or '–'} | {status} | {', '.join(kinds)} | {untraced} | "
        f"{arch.caveat or '–'} |"
    )


if __name__ == "__main__":
    print("| model | class | task type | passes | traced candidate kinds | μ = 1 (named in one warning) | notes |")
    print("|---|---|---|---|---|---|---|")
    for arch_name in ARCHS:
        print(describe(arch_name))
