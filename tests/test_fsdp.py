"""FSDP2 (`fully_shard`): the exact global draw over dim-0 shards, on 2 gloo processes against one process holding the
whole model and the global batch; saving from rank 0, loading onto sharded models, merging, `disable_adapter`; the
refusal of FSDP1 and DeepSpeed, naming FSDP2.

The 2-process runs are launched once per module (`tests/fsdp_worker.py`); each rank trains on its own rows.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_stoc import StocTuningConfig
from peft_stoc.distributed import ranks as distributed
from peft_stoc.distributed import sharded_draw, shards
from peft_stoc.distributed.ranks import UnsupportedDistributedSetup

from . import fsdp_worker as worker
from .helpers import batch, tiny_model
from .test_distributed import ADAPTER_FILES, _free_port, _launch
from .test_selection import _importance_of, _model_like_sources, _numpy_frequencies

# Two processes with half the batch each against one process with all of it: gradients are reduce-scattered (summed
# in another order) and μ summed in another order, so weights agree up to float rounding (measured: at most 6e-8
# after 5 AdamW steps).
WEIGHT_TOLERANCE = 1e-6
LOGIT_TOLERANCE = 1e-5
ARCHS = ["bert", "gpt2", "llama"]
SCENARIOS = [
    "train_bert",
    "train_gpt2",
    "train_llama",
    "stochastic",
    "budget",
    "resume",
    "load_bert",
    "load_gpt2",
    "load_llama",
    "frequency",
    "fill",
    "accelerate",
    "trainer",
    "disabled",
]


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "tests.fsdp_worker",
        str(out),
        *SCENARIOS,
    ]
    _launch(command, tmp_path_factory.mktemp("home"))
    return out


def _ranks(out, scenario: str) -> tuple[dict, dict]:
    return tuple(load_file(str(out / f"{scenario}.rank{rank}.safetensors")) for rank in (0, 1))


def _masks(record: dict) -> list[torch.Tensor]:
    return [record[f"mask.{step}"] for step in range(worker.STEPS)]


@pytest.fixture(scope="module")
def single_process():
    """The reference per architecture: one process, the whole model, the global batch of 8 rows per step."""
    found = {}

    def run(arch: str, **config):
        key = (arch, tuple(sorted(config.items())))
        if key not in found:
            model = worker.make_model(arch, **config)
            masks = worker.train(model, arch, rank=0, world=1)
            found[key] = model, masks
        return found[key]

    return run


# -- the draw ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_top_draws_the_single_process_entries_at_every_step(fsdp_out, single_process, arch):
    rank0, rank1 = _ranks(fsdp_out, f"train_{arch}")
    model, masks = single_process(arch)
    for step, (a, b, expected) in enumerate(zip(_masks(rank0), _masks(rank1), masks)):
        assert a.numel() == 40 and torch.equal(a, b), f"ranks disagree at step {step}"
        assert torch.equal(a, expected), f"step {step} drew other entries than the single process"
    weights = worker.whole_weights(model)
    trained = {key.removeprefix("weight."): value for key, value in rank0.items() if key.startswith("weight.")}
    assert trained.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=name)
    untrained = worker.whole_weights(worker.make_model(arch))
    assert any(not torch.equal(trained[name], untrained[name]) for name in untrained)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_holds_its_shard_only(fsdp_out, single_process, arch):
    model, _ = single_process(arch)
    stats = model.stoc_stats()
    held = []
    for record in _ranks(fsdp_out, f"train_{arch}"):
        step, drawn, changed, grad_bytes, state_bytes, _, _, _, freed = record["figures"].tolist()
        assert (step, drawn, changed) == (worker.STEPS, 40, stats["changed"])  # changed: counted over both ranks
        assert grad_bytes <= 0.55 * stats["grad_bytes"]  # the shard's gradients: about half of the whole model's
        assert 0 < state_bytes < stats["optimizer_state_bytes"]  # sparse state of the entries drawn in the shard
        assert freed == 1  # no reference to the whole parameters FSDP2 replaced survives
        held.append(grad_bytes)
    assert sum(held) == stats["grad_bytes"]


def test_stochastic_draws_the_single_process_entries_at_every_step(fsdp_out, single_process):
    # Every entry's random number depends only on (seed, step, entry): two ranks holding half of the rows each draw
    # the entries one process draws for the same seed.
    rank0, _ = _ranks(fsdp_out, "stochastic")
    _, masks = single_process("bert", selection="stochastic")
    for step, (a, expected) in enumerate(zip(_masks(rank0), masks)):
        assert torch.equal(a, expected), f"step {step} drew other entries than the single process"


def test_stochastic_masks_are_identical_on_every_rank(fsdp_out):
    rank0, rank1 = _ranks(fsdp_out, "stochastic")
    draws = _masks(rank0)
    for step, (a, b) in enumerate(zip(draws, _masks(rank1))):
        assert torch.equal(a, b) and a.numel() == 40 and a.unique().numel() == 40, step
    assert len({tuple(d.tolist()) for d in draws}) == worker.STEPS  # a fresh draw at every step


def test_merged_stochastic_draw_matches_numpy_choice(fsdp_out):
    # Each rank draws over its rows of every tensor with its own random stream; the merged draw must have the
    # inclusion frequencies of numpy.random.choice(replace=False, p ∝ I²) over the whole, as the single-process
    # draw does (tests/test_streaming.py, same checks).
    rank0, rank1 = _ranks(fsdp_out, "frequency")
    assert torch.equal(rank0["counts"], rank1["counts"])  # every rank saw the same whole draws
    k, trials = worker.FREQUENCY_K, worker.FREQUENCY_TRIALS
    ours = (rank0["counts"] / trials).numpy()
    assert ours.sum() == pytest.approx(k)
    reference = _numpy_frequencies(k, trials)
    sources = _model_like_sources()
    weight = _importance_of(sources)
    assert ours[(weight == 0).numpy()].sum() == 0
    frequent = reference >= 0.02
    spread = np.sqrt((reference * (1 - reference) + ours * (1 - ours)) / trials)
    assert np.all(np.abs(ours - reference)[frequent] <= 5 * spread[frequent]), (ours[frequent], reference[frequent])
    offsets = np.cumsum([0] + [s.numel for s in sources])
    for lo, hi in [(0, len(ours))] + list(zip(offsets[:-1], offsets[1:])):
        mask = ~frequent[lo:hi]
        a, b = ours[lo:hi][mask].sum(), reference[lo:hi][mask].sum()
        assert abs(a - b) <= 5 * np.sqrt((a + b) / trials) + 2 / trials, (lo, hi, a, b)


def test_merged_draw_fills_uniformly_from_zero_importance_entries_of_every_rank(fsdp_out):
    counts = _ranks(fsdp_out, "fill")[0]["counts"] / 2000
    assert counts[1] == counts[4] == 1.0  # the non-zero entry of each rank
    assert torch.allclose(counts[[0, 2, 3, 5]], torch.full((4,), 0.5, dtype=torch.float64), atol=0.05)


def test_budget_counts_the_entries_changed_on_every_rank(fsdp_out, single_process):
    rank0, rank1 = _ranks(fsdp_out, "budget")
    model, masks = single_process("bert", max_changed=60)
    for a, b, expected in zip(_masks(rank0), _masks(rank1), masks):
        assert torch.equal(a, expected) and torch.equal(b, expected)
    assert int(rank0["changed"]) == int(rank1["changed"]) == model.stoc_stats()["changed"] == 60


def test_draw_communicates_a_few_hundred_bytes(fsdp_out):
    # The merged draw sends no key and no gradient: counts at probe values (6 rounds of 504 bytes at most for
    # float32 keys) and a few 8-byte totals. μ's all-reduce is DDP's (`bytes_per_draw`, which also counts the
    # 48-byte draw fingerprint DDP sends).
    rank0, _ = _ranks(fsdp_out, "train_bert")
    draw_bytes, rounds, statistics_bytes = rank0["figures"].tolist()[5:8]
    assert 0 < draw_bytes <= 8 * 504 + 64 and rounds <= 12
    candidates = worker.make_model("bert").base_model.stoc_engine().candidates
    assert statistics_bytes == distributed.bytes_per_draw(candidates)


# -- checkpoints of a run in progress ----------------------------------------------------------------------------------
def test_run_resumes_exactly_from_the_model_state_dict_and_each_ranks_optimizer_state(fsdp_out):
    for record in _ranks(fsdp_out, "resume"):
        for step in range(3, worker.STEPS):
            assert torch.equal(record[f"resumed.{step - 3}"], record[f"straight.{step - 3}"]), step
        weights = {k.removeprefix("weight."): v for k, v in record.items() if k.startswith("weight.")}
        for name, value in weights.items():
            assert torch.equal(record[f"resumed_weight.{name}"], value), name


def test_distributed_checkpoint_of_the_optimizer_is_refused_with_the_way_out(fsdp_out):
    for record in _ranks(fsdp_out, "resume"):
        refusal = bytes(record["dcp_refusal"].tolist()).decode()
        assert "'peft_stoc.default'" in refusal and "save_only_model=True" in refusal, refusal


# -- through accelerate and Trainer ------------------------------------------------------------------------------------
def test_accelerate_fsdp2_plugin_draws_the_single_process_entries(fsdp_out, single_process):
    rank0, rank1 = _ranks(fsdp_out, "accelerate")
    model, masks = single_process("bert")
    for a, b, expected in zip(_masks(rank0), _masks(rank1), masks):
        assert torch.equal(a, expected) and torch.equal(b, expected)
    # accelerate's full state dict (on rank 0) holds the originals of every rank's changed entries: those of one
    # process.
    patch = {k: v for k, v in model.state_dict().items() if ".stoc_tuning.patch." in k}
    got = {k.removeprefix("state."): v for k, v in rank0.items() if k.startswith("state.")}
    assert patch and got.keys() == patch.keys() and all(torch.equal(got[k], v) for k, v in patch.items())
    loaded = PeftModel.from_pretrained(worker.base_model("bert"), str(fsdp_out / "accelerate_adapter"))
    torch.testing.assert_close(worker.logits(loaded, "bert"), rank0["logits"], rtol=0, atol=LOGIT_TOLERANCE)


def test_trainer_with_fsdp2_matches_trainer_on_one_process_and_saves_from_rank_0_alone(fsdp_out, tmp_path):
    rank0, rank1 = _ranks(fsdp_out, "trainer")
    _, model, masks = worker.run_trainer(tmp_path, world=1, fsdp=False)
    for step, (a, b, expected) in enumerate(zip(_masks(rank0), _masks(rank1), masks)):
        assert torch.equal(a, b) and torch.equal(a, expected), step
    torch.testing.assert_close(worker.logits(model, "bert"), rank0["logits"], rtol=0, atol=LOGIT_TOLERANCE)
    assert ADAPTER_FILES <= set(os.listdir(fsdp_out / "trainer_adapter"))
    loaded = PeftModel.from_pretrained(worker.base_model("bert"), str(fsdp_out / "trainer_adapter"))
    torch.testing.assert_close(worker.logits(loaded, "bert"), rank0["logits"], rtol=0, atol=LOGIT_TOLERANCE)


# -- saving, loading, merging, disabling -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_saved_on_rank_0_reproduces_the_fsdp_logits_in_one_process(fsdp_out, arch):
    assert set(os.listdir(fsdp_out / f"{arch}_adapter")) == ADAPTER_FILES
    rank0, rank1 = _ranks(fsdp_out, f"train_{arch}")
    assert torch.equal(rank0["logits"], rank1["logits"])
    loaded = PeftModel.from_pretrained(worker.base_model(arch), str(fsdp_out / f"{arch}_adapter"))
    torch.testing.assert_close(worker.logits(loaded, arch), rank0["logits"], rtol=0, atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_shows_the_base_under_fsdp2(fsdp_out, arch):
    base = worker.logits(worker.base_model(arch), arch)
    trained, _ = _ranks(fsdp_out, f"train_{arch}")
    loaded, _ = _ranks(fsdp_out, f"load_{arch}")
    for record in (trained, loaded):
        torch.testing.assert_close(record["disabled_logits"], base, rtol=0, atol=LOGIT_TOLERANCE)
    assert torch.equal(trained["logits_after_disable"], trained["logits"])  # the adapted values are back
    torch.testing.assert_close(loaded["logits_after_disable"], trained["logits"], rtol=0, atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_loading_onto_a_sharded_model_and_merging_are_exact(fsdp_out, arch):
    trained, _ = _ranks(fsdp_out, f"train_{arch}")
    rank0, rank1 = _ranks(fsdp_out, f"load_{arch}")
    for record in (rank0, rank1):
        torch.testing.assert_close(record["logits"], trained["logits"], rtol=0, atol=LOGIT_TOLERANCE)
        torch.testing.assert_close(record["merged_logits"], trained["logits"], rtol=0, atol=LOGIT_TOLERANCE)
        if "onto_sharded_logits" in record:  # loaded onto a model sharded already: each rank applied its rows
            torch.testing.assert_close(record["onto_sharded_logits"], trained["logits"], rtol=0, atol=LOGIT_TOLERANCE)
    assert arch != "llama" or "onto_sharded_logits" in rank0
    merged = PeftModel.from_pretrained(worker.base_model(arch), str(fsdp_out / f"{arch}_adapter")).merge_and_unload()
    expected = dict(merged.named_parameters())
    got = {key.removeprefix("merged."): value for key, value in rank0.items() if key.startswith("merged.")}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value.detach()), name  # base + delta, bit for bit


# -- in one process: a gloo group of one -------------------------------------------------------------------------------
@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train(model, steps: int = 3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    draws = []
    for step in range(steps):
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        draws.append(worker.whole_draw(model))
    return draws


@pytest.mark.parametrize("selection", ["top", "random"])
def test_fully_shard_on_one_process_trains_as_the_unsharded_model(one_process_group, selection):
    from torch.distributed.fsdp import fully_shard

    config = StocTuningConfig(k=40, task_type="SEQ_CLS", selection=selection)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    plain = get_peft_model(tiny_model(**no_dropout), config)
    sharded = get_peft_model(tiny_model(**no_dropout), config)
    fully_shard(sharded)
    for a, b in zip(_train(plain), _train(sharded)):
        assert torch.equal(a, b)
    ours, theirs = worker.whole_weights(plain), worker.whole_weights(sharded)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def _sharded_or_not(sharded: bool):
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    if sharded:
        fully_shard(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("saved_sharded", [True, False])
def test_optimizer_state_of_another_layout_is_refused_before_anything_changes(one_process_group, saved_sharded):
    model, optimizer = _sharded_or_not(saved_sharded)
    model(**batch()).loss.backward()
    optimizer.step()
    saved = optimizer.state_dict()
    other, again = _sharded_or_not(not saved_sharded)
    again.load_state_dict(saved)
    before = worker.whole_weights(other)
    other(**batch()).loss.backward()
    with pytest.raises(UnsupportedDistributedSetup, match="optimizer's StocTuning state") as info:
        again.step()
    assert ("rank 0 of 1" in str(info.value)) and ("whole parameters" in str(info.value))
    after = worker.whole_weights(other)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_fsdp2_needs_the_memory_lean_mode(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS", memory="dense"))
    fully_shard(model)
    with pytest.raises(UnsupportedDistributedSetup, match="memory"):
        _train(model, steps=1)
    # The refused engine stays with its model: it knows its optimizers by the shards, not by the parameters
    # `fully_shard` freed, whose ids may come back with the parameters of another model (and its optimizer).
    engine = model.base_model.stoc_engine()
    assert all(shards.is_shard(c.param) for c in engine.candidates)
    assert set(engine._ids) == {id(c.param) for c in engine.candidates}


def test_an_optimizer_stoctuning_cannot_apply_is_refused_under_fsdp2(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    fully_shard(model)
    optimizer = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch()).loss.backward()
    with pytest.raises(UnsupportedDistributedSetup, match="Adagrad"):
        optimizer.step()


def test_dtensors_fsdp2_does_not_manage_are_refused(one_process_group):
    # Tensor parallelism gives DTensor parameters too: StocTuning only follows FSDP2's dim-0 shards.
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    mesh = init_device_mesh("cpu", (1,))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    query.weight = torch.nn.Parameter(distribute_tensor(query.weight.detach(), mesh, [Replicate()]))
    with pytest.raises(UnsupportedDistributedSetup, match="DTensor"):
        model(**batch()).loss.backward()


def test_an_initialised_deepspeed_is_refused_naming_fsdp2(monkeypatch):
    # DeepSpeed cannot be installed and started here: its signal, an initialised `deepspeed.comm`, is put in place.
    fake = types.ModuleType("deepspeed.comm")
    fake.is_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "deepspeed.comm", fake)
    with pytest.raises(UnsupportedDistributedSetup, match="DeepSpeed is initialised") as info:
        get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    assert "FSDP2" in str(info.value) and "fully_shard" in str(info.value)


@pytest.mark.parametrize("version, refused", [(1, True), (2, False)])
def test_accelerate_fsdp_plugin_version(monkeypatch, version, refused):
    import accelerate.state
    from accelerate.utils import DistributedType

    class Plugin:
        fsdp_version = version

    monkeypatch.setattr(
        accelerate.state.AcceleratorState,
        "_shared_state",
        {"distributed_type": DistributedType.FSDP, "fsdp_plugin": Plugin()},
    )
    # accelerate copies the distributed type, not the plugin, to PartialState
    monkeypatch.setattr(accelerate.state.PartialState, "_shared_state", {"distributed_type": DistributedType.FSDP})
    if refused:
        with pytest.raises(UnsupportedDistributedSetup, match="FSDP version 1") as info:
            get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
        assert "fsdp_version=2" in str(info.value)
    else:
        get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))


def test_shard_sync_top_agrees_with_topk_on_one_process(one_process_group):
    sync = sharded_draw.ShardSync()
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 200, (1,), generator=generator))
        keys = torch.randn(n, generator=generator) * 10
        keys[torch.rand(n, generator=generator) < 0.2] = -float("inf")
        if trial % 3 == 0:
            keys = keys.round()  # ties
        k = int(torch.randint(1, 60, (1,), generator=generator))
        mask, total = sync.top(keys, k)
        valid = keys > -float("inf")
        assert total == int(valid.sum()) and int(mask.sum()) == min(k, total)
        if mask.any():
            kth = keys[mask].min()
            assert bool((keys[valid & ~mask] <= kth).all())


def test_a_backward_inside_disable_adapter_is_refused_on_every_rank(fsdp_out):
    # A reference pass between the policy's forward and backward trained as usual before (the scenario's first step).
    for record in _ranks(fsdp_out, "disabled"):
        refused, left = record["figures"].tolist()
        assert refused == 1 and left == 0
