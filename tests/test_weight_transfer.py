"""The GPU weight path (``sync.backend: nccl``, vLLM's weight-transfer API) minus the NCCL data
plane, on CPU: the learner's weight source (casting, tied weights, ZeRO-3 gathers one bucket at a
time: faked and with real DeepSpeed), packing through vLLM's own packer, per-engine rank offsets,
the control-plane client, the driver's wiring, and the hard errors where NCCL is missing (vLLM's
PyNcclCommunicator itself stays silent: shown here). The end-to-end GPU check is tests/gpu/."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from _learner_util import free_port

from nlhf.sync.weight_transfer import (
    MiB,
    LearnerWeightSource,
    NcclUnavailableError,
    PoolClient,
    check_communicator,
    plan_gather_buckets,
    rank_offsets,
    require_nccl,
)


# ----------------------------------------------------------------------------- pure planning
def test_rank_offsets_place_every_engine_rank_once():
    assert rank_offsets([1]) == ([1], 2)
    assert rank_offsets([1, 1]) == ([1, 2], 3)  # vLLM's own Ray client would give both offset 1
    offsets, world = rank_offsets([2, 2, 2])  # 3 engines, TP 2
    assert (offsets, world) == ([1, 3, 5], 7)
    ranks = [o + r for o in offsets for r in range(2)]
    assert sorted(ranks) == list(range(1, world))  # 0 is the trainer; no rank twice
    with pytest.raises(ValueError):
        rank_offsets([])
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        rank_offsets([1, 0])


def test_gather_buckets_respect_the_limit_and_order():
    assert plan_gather_buckets([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert plan_gather_buckets([3] * 5, 100) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="sync.bucket_mb"):
        plan_gather_buckets([1], 0)


# ----------------------------------------------------------------------------- the weight source
class Tiny(torch.nn.Module):
    """Embedding tied to the LM head, a linear layer, persistent float, int64 and bool buffers, and
    a non-persistent one (not part of the state dict: never sent)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(40, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 40, bias=False)
        self.lm_head.weight = self.embed.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.register_buffer("scale", torch.tensor([1.5, 2.5]))
        self.register_buffer("steps", torch.arange(3, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)


def _expected(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: (t.detach().to(dtype) if t.is_floating_point() else t.detach())
            for n, t in module.state_dict().items() if n != "lm_head.weight"}


def test_source_casts_to_the_engine_dtype_and_agrees_with_its_metadata():
    m = Tiny()
    src = LearnerWeightSource(m, dtype=torch.bfloat16, device="cpu", bucket_bytes=1024)
    meta = src.metadata()
    want = _expected(m, torch.bfloat16)
    # the tied head once, the non-persistent buffer never; widest element first, parameters in order
    assert [x.name for x in meta] == ["steps", "embed.weight", "proj.weight", "proj.bias", "scale", "mask"]
    assert set(want) == {x.name for x in meta}
    got = list(src)
    assert [n for n, _ in got] == [x.name for x in meta]
    for (name, t), x in zip(got, meta):
        assert t.dtype == x.dtype == want[name].dtype and tuple(t.shape) == x.shape, name
        assert torch.equal(t, want[name]), name
    assert dict(got)["steps"].dtype == torch.int64  # integers are not cast
    assert src.nbytes == sum(t.numel() * t.element_size() for t in want.values())
    assert [n for n, _ in src] == [n for n, _ in got]  # re-iterable: a fresh pass each push


def test_source_packs_and_unpacks_through_vllms_packer():
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    m = Tiny()
    src = LearnerWeightSource(m, dtype=torch.bfloat16, device="cpu")
    want = _expected(m, torch.bfloat16)
    it = iter(src)
    chunks = []
    while (chunk := pack_tensors(it, lambda item: item[1], buffer_size_bytes=1024)) is not None:
        chunks.append(chunk)
    assert len(chunks) > 1 and all(c.packed_tensor.dtype == torch.uint8 for c in chunks)
    # an int64 buffer behind 37 bf16 values would start at an odd byte: vLLM's unpack_tensor raises
    odd = torch.nn.Module()
    odd.w = torch.nn.Parameter(torch.ones(37))
    odd.register_buffer("n", torch.arange(2, dtype=torch.int64))
    packed = pack_tensors(iter(LearnerWeightSource(odd, dtype=torch.bfloat16, device="cpu")), lambda x: x[1], 1 << 20)
    back = dict(unpack_tensor(packed.packed_tensor, packed.names, packed.shapes, packed.dtypes, packed.tensor_sizes))
    assert torch.equal(back["n"], odd.n) and torch.equal(back["w"], torch.ones(37, dtype=torch.bfloat16))
    out = {}
    for c in chunks:
        out.update(unpack_tensor(c.packed_tensor, c.names, c.shapes, c.dtypes, c.tensor_sizes))
    assert set(out) == set(want)
    for name, t in want.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


def _fake_zero3(module: torch.nn.Module):
    """Partition every parameter as ZeRO-3 does (data -> empty, full shape in ds_shape) and return
    a gather factory that restores a bucket, records it, and on release ZEROES the full tensors
    before dropping them (so a source that yielded views instead of copies would send zeros)."""
    full = {}
    for k, p in enumerate(module.parameters()):
        full[p] = p.data.clone()
        p.ds_shape, p.ds_id = tuple(p.shape), k
        p.data = torch.empty(0)
    log: list[list[int]] = []
    live: set = set()

    @contextlib.contextmanager
    def gather(params):
        assert not live, "a second bucket was gathered before the first was released"
        log.append([p.ds_id for p in params])
        for p in params:
            p.data = full[p].clone()
            live.add(p)
        try:
            yield
        finally:
            for p in params:
                p.data.zero_()
                p.data = torch.empty(0)
                live.discard(p)

    return full, gather, log


def test_zero3_source_gathers_one_bucket_at_a_time_in_metadata_order():
    m = Tiny()
    want = _expected(m, torch.float32)  # same dtype: only an explicit copy survives the release
    full, gather, log = _fake_zero3(m)
    bucket = 16 * 16 * 4 + 16 * 4  # proj.weight + proj.bias
    src = LearnerWeightSource(m, dtype=torch.float32, device="cpu", zero3=True, bucket_bytes=bucket, gather=gather)
    meta = src.metadata()  # from ds_shape: no gather
    shapes = {x.name: x.shape for x in meta}
    assert log == [] and [shapes[n] for n in ("embed.weight", "proj.weight", "proj.bias")] == [(40, 16), (16, 16), (16,)]
    got = dict(src)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name  # copied while gathered, valid after the release
    ids = {n: p.ds_id for n, p in m.named_parameters()}
    assert log == [[ids["embed.weight"]], [ids["proj.weight"], ids["proj.bias"]]]  # buffers need no gather
    assert all(p.numel() == 0 for p in m.parameters())  # everything released again


def test_zero3_source_refuses_a_shard_that_was_not_gathered():
    m = Tiny()
    _fake_zero3(m)
    src = LearnerWeightSource(m, dtype=torch.float32, device="cpu", zero3=True,
                              gather=lambda params: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="not gathered"):
        list(src)


_REAL_ZERO3 = r"""
import sys
import deepspeed, torch
from _learner_util import learner, make_cfg
from nlhf.sync.weight_transfer import MiB, LearnerWeightSource

with learner(make_cfg(learner={"zero_stage": 3}), sys.argv[1]) as w:
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in w.gathered_state_dict().items()}
    calls = []  # (parameters, bf16 bytes) of each gather

    def counted(params):
        calls.append((len(params), sum(p.ds_numel for p in params) * 2))
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    shards = [p for p in w.engine.module.parameters() if hasattr(p, "ds_id")]
    assert shards and all(p.numel() == 0 for p in shards)  # really partitioned outside a gather
    limit = MiB // 8
    src = LearnerWeightSource(w.engine.module, dtype=torch.bfloat16, device="cpu", zero3=True, bucket_bytes=limit,
                              gather=counted)
    assert [m.shape for m in src.metadata()] == [tuple(want[m.name].shape) for m in src.metadata()]  # no gather
    assert calls == []
    got = dict(src)
    total = sum(p.ds_numel for p in shards) * 2
    assert all(p.numel() == 0 for p in shards)  # released again
assert set(got) == set(want), (set(got) ^ set(want))
for name, t in want.items():
    assert got[name].shape == t.shape and torch.equal(got[name], t), name
assert len(calls) > 1, calls  # bucket by bucket, not the whole model at once
assert all(nbytes <= limit or n == 1 for n, nbytes in calls), calls  # only a lone oversized tensor exceeds it
assert sum(nbytes for _, nbytes in calls) == total  # every shard gathered exactly once
print("gathers", len(calls))
"""


def test_zero3_source_with_real_deepspeed_matches_the_gathered_state_dict(tiny_model_dir):
    """A real ZeRO-3 learner (CPU, one rank; in its own process, as DeepSpeed's ZeRO-3 state does
    not survive other learners in one process): the source's per-bucket GatheredParameters give
    the full weights, cast, and no gather holds more than one bucket."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent / "system"), str(tests)]), DS_ACCELERATOR="cpu")
    res = subprocess.run([sys.executable, "-c", _REAL_ZERO3, str(tiny_model_dir)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert int(res.stdout.split("gathers")[-1]) > 1


# ----------------------------------------------------------------------------- control plane
class FakeEngine:
    """Records the calls PoolClient makes on one rollout worker."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.version = 0

    def check_weight_transfer(self):
        self.calls.append(("check",))
        return [{"rank": 0}]

    def init_weight_transfer_engine(self, info):
        self.calls.append(("init", info["rank_offset"], info["world_size"]))
        return [info["rank_offset"]]

    def start_weight_update(self):
        self.calls.append(("start",))

    def update_weights(self, info):
        self.calls.append(("update", tuple(info["names"])))

    def finish_weight_update(self, version):
        self.calls.append(("finish", version))
        self.version = version

    def shutdown_weight_transfer_engine(self):
        self.calls.append(("shutdown",))


def test_pool_client_gives_each_engine_its_rank_offset_and_every_push_a_version():
    engines = [FakeEngine(), FakeEngine()]
    offsets, world = rank_offsets([2, 2])
    client = PoolClient(engines, offsets)
    client.preflight()
    client.init_weight_transfer_engine({"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": world})
    assert [e.calls[-1] for e in engines] == [("init", 1, 5), ("init", 3, 5)]
    client.start_weight_update()
    client.update_weights({"names": ["a"], "dtype_names": ["float32"], "shapes": [[1]]})
    with pytest.raises(RuntimeError, match="no weight version"):
        client.finish_weight_update()  # vLLM's trainer engine calls it without a version
    client.version = 7
    client.finish_weight_update()
    assert [e.version for e in engines] == [7, 7]
    client.finish_weight_update(weight_version="8")
    assert [e.version for e in engines] == [8, 8]
    with pytest.raises(ValueError):
        PoolClient(engines, [1])


# ----------------------------------------------------------------------------- missing NCCL
def test_require_nccl_names_the_problem(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(NcclUnavailableError, match="no CUDA device.*object_store"):
            require_nccl("learner rank 0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # the CPU build's NCCLLibrary refuses to load: the case PyNcclCommunicator swallows
    with pytest.raises(NcclUnavailableError, match="NCCL library cannot be loaded"):
        require_nccl("learner rank 0")
    monkeypatch.setenv("VLLM_DISABLE_PYNCCL", "1")
    with pytest.raises(NcclUnavailableError, match="VLLM_DISABLE_PYNCCL"):
        require_nccl("rollout worker rank 0")


def test_vllm_communicator_without_nccl_is_silent_and_check_communicator_is_not():
    """Two ranks build vLLM's PyNcclCommunicator without an NCCL library: no error, and a
    broadcast 'succeeds' while sending nothing. check_communicator turns that into an error."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    port, comms = free_port(), [None, None]

    def join(rank: int) -> None:
        pg = StatelessProcessGroup.create(host="127.0.0.1", port=port, rank=rank, world_size=2, store_timeout=60)
        comms[rank] = PyNcclCommunicator(pg, device="cpu")

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(c is not None for c in comms)
    sent, received = torch.ones(4), torch.zeros(4)
    comms[0].broadcast(sent, src=0)
    comms[1].broadcast(received, src=0)
    assert torch.equal(received, torch.zeros(4))  # nothing arrived, and nobody said so
    for rank, comm in enumerate(comms):
        with pytest.raises(NcclUnavailableError, match="disabled itself"):
            check_communicator(comm, f"rank {rank}")
    with pytest.raises(NcclUnavailableError, match="no weight-transfer communicator"):
        check_communicator(None, "rollout worker rank 0")


def test_sender_without_nccl_fails_before_any_engine_is_contacted():
    from nlhf.sync.weight_transfer import WeightTransferSender

    if torch.cuda.is_available():
        pytest.skip("CUDA present: this checks the CPU-only failure")
    engine = FakeEngine()
    with pytest.raises(NcclUnavailableError, match="learner rank 0"):
        WeightTransferSender(Tiny(), rank=0, master_address="127.0.0.1", master_port=free_port(), world_size=2,
                             client=PoolClient([engine], [1]), dtype=torch.float32, device="cpu")
    assert engine.calls == []  # no preflight, no rendezvous started: nothing left waiting


def test_extension_checks_the_engines_communicator():
    from types import SimpleNamespace

    from nlhf.rollout.extension import WeightReceiver

    worker = WeightReceiver()
    worker.rank = 1
    worker.weight_transfer_engine = SimpleNamespace(model_update_group=SimpleNamespace(disabled=True, available=False))
    with pytest.raises(NcclUnavailableError, match="rollout worker rank 1"):
        worker.nlhf_check_transfer_group()
    worker.weight_transfer_engine.model_update_group = SimpleNamespace(disabled=False, available=True, rank=3)
    assert worker.nlhf_check_transfer_group() == 3
    if not torch.cuda.is_available():
        with pytest.raises(NcclUnavailableError, match="no CUDA"):
            worker.nlhf_transfer_preflight()


def test_rollout_worker_refuses_nccl_on_cpu_before_building_an_engine():
    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    with pytest.raises(NcclUnavailableError, match="sync.backend 'nccl'.*object_store"):
        RolloutWorker("/nonexistent", RolloutConfig(num_gpus=0), pool="current", weight_transfer="nccl")
    with pytest.raises(ValueError, match="weight_transfer"):
        RolloutWorker("/nonexistent", RolloutConfig(), pool="current", weight_transfer="ipc")


# ----------------------------------------------------------------------------- driver wiring
class FakePool:
    def __init__(self, transfer: str | None, n: int) -> None:
        self.weight_transfer, self.dtype = transfer, "bfloat16"
        self.workers = [FakeEngine() for _ in range(n)]
        self.pushed: list = []
        self.loaded: list = []

    def mark_pushed(self, version: int) -> None:
        self.pushed.append(version)

    def load_weights(self, ref, version: int) -> list[dict]:
        self.loaded.append((ref, version))
        return [{"bytes": 10, "seconds": 0.1}]


class FakeLearners:
    placement_group = None

    def __init__(self) -> None:
        self.opened: list = []
        self.pushes: list = []

    def init_weight_transfer(self, name, addr, port, world, workers, offsets, dtype):
        self.opened.append((name, addr, world, len(workers), offsets, dtype))

    def push_weights(self, name, version):
        self.pushes.append((name, version))
        return {"seconds": 0.5, "bytes": 1234, "tensors": 3, "version": version}

    def state_dict_ref(self, dtype):
        return f"ref-{dtype}"


def test_weight_sync_nccl_opens_one_group_per_vllm_pool_and_versions_every_push():
    from _learner_util import make_cfg

    from nlhf.pipeline import WeightSync
    from nlhf.run_state import Counters

    cfg = make_cfg(learner={"num_gpus": 1}, rollout={"num_gpus": 1, "num_workers": 2}, sync={"backend": "nccl"})
    pools = {"current": FakePool("nccl", 2), "extrapolated": FakePool(None, 2)}  # the mixture sampler: bytes
    learners, counters, versions = FakeLearners(), Counters(), {"current": 0, "extrapolated": 0}
    sync = WeightSync(cfg, learners, pools, counters, versions)
    assert learners.opened == [("current", "127.0.0.1", 3, 2, [1, 2], "bfloat16")]
    assert sync.push("current")["bytes"] == 1234
    assert learners.pushes == [("current", 1)] and pools["current"].pushed == [1] and versions["current"] == 1
    sync.push("extrapolated")
    assert pools["extrapolated"].loaded == [("ref-bfloat16", 1)] and learners.pushes == [("current", 1)]
    sync.push("current")
    assert learners.pushes[-1] == ("current", 2) and counters.sync_bytes == 1234 * 2 + 10
    # a new learner group (restart): the engines leave the old group, the new rank 0 opens a new one
    fresh = FakeLearners()
    sync.learners = fresh
    assert all(w.calls[-1] == ("shutdown",) for w in pools["current"].workers)
    assert fresh.opened == [("current", "127.0.0.1", 3, 2, [1, 2], "bfloat16")]
    # the object store path opens nothing
    plain = FakeLearners()
    WeightSync(make_cfg(), plain, {"current": FakePool(None, 1)}, Counters(), {"current": 0})
    assert plain.opened == []
