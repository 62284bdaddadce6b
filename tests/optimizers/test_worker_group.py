"""Workers that are torch.distributed process groups (`lowcomm.optimizers.worker_group`).

The multi-process tests run 2 workers x 2 ranks (gloo on CPU, DDP or FSDP2
inside each worker) as 4 subprocesses (tests/optimizers/group_node.py), the
workers averaging over the real swarm on loopback (hivemind's p2pd), one swarm
per rank slot. The reference: 2 single-process workers on a `LocalSwarm` in
this process, each seeing the concatenation of its two ranks' micro-batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from lowcomm.averaging import shard_bounds
from lowcomm.compressors import get_compressor, wire_size
from lowcomm.optimizers import CompressedDataParallel, DataParallel, DiLoCo, NoLoCo, WorkerGroupAverager
from lowcomm.optimizers.worker_group import slice_bounds
from lowcomm.sim import LocalSwarm
from tests.optimizers.group_node import H, dgc_codec, global_batch, make_model, train

ROOT = Path(__file__).resolve().parents[2]
NUMEL = 20_481  # make_model's parameters
NONE = get_compressor("none")


# --- slice arithmetic (no processes) ---
def test_slices_are_aligned_contiguous_and_cover_everything():
    assert slice_bounds(10, 2) == [(0, 5), (5, 10)]
    assert slice_bounds(11, 3) == [(0, 4), (4, 8), (8, 11)]        # G not dividing: the first ranks one more
    assert slice_bounds(10_000, 2, 4096) == [(0, 8192), (8192, 10_000)]  # 3 blocks: 2 then 1 (the short tail)
    assert slice_bounds(9000, 4, 4096) == [(0, 4096), (4096, 8192), (8192, 9000), (9000, 9000)]
    assert slice_bounds(10, 2, 4096) == [(0, 10), (10, 10)]         # smaller than one block: rank 1 empty
    assert slice_bounds(0, 3) == [(0, 0)] * 3
    for numel, parts, unit in [(481, 2, 64), (100_003, 3, 4096), (7, 8, 1), (4096 * 5, 2, 4096)]:
        bounds = slice_bounds(numel, parts, unit)
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(lo % unit == 0 or lo == numel for lo, _ in bounds)
    with pytest.raises(ValueError, match="unit"):
        slice_bounds(10, 2, 0)


def test_codec_units_are_their_blocks_and_chunks():
    assert get_compressor("none").unit == 1 and get_compressor("fp16").unit == 1
    assert get_compressor("int8", block_size=256).unit == 256
    assert get_compressor("topk", chunk_size=64).unit == 64
    # a sliced top-k at chunk multiples is the whole vector's, piece by piece
    x = torch.randn(481, generator=torch.Generator().manual_seed(0))
    topk = get_compressor("topk", chunk_size=64, density=1 / 8)
    whole = topk.decompress(topk.compress(x))
    pieces = [topk.decompress(topk.compress(x[a:b])) for a, b in slice_bounds(481, 2, 64)]
    assert torch.equal(torch.cat(pieces), whole)


class _Group:
    """What `WorkerGroupAverager.pieces` needs of one (imaginary) rank."""

    def __init__(self, rank, size, mode="split", copies=1):
        self.rank, self.size, self.mode, self.copies = rank, size, mode, copies


def test_pieces_slice_each_copy_alike_and_rank0_takes_all():
    pieces = WorkerGroupAverager.pieces
    assert pieces(_Group(0, 2), 10) == [[(0, 5)], [(5, 10)]]
    # NoLoCo's phi and theta - phi (5 values each): rank r takes the same coordinates of both
    assert pieces(_Group(0, 2, copies=2), 10) == [[(0, 3), (5, 8)], [(3, 5), (8, 10)]]
    assert pieces(_Group(1, 3, copies=2), 4, 4096) == [[(0, 2), (2, 4)], [], []]
    assert pieces(_Group(1, 2, mode="rank0"), 10) == [[(0, 10)], []]
    with pytest.raises(ValueError, match="equal copies"):
        pieces(_Group(0, 2, copies=2), 11)


def test_a_worker_group_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        WorkerGroupAverager(LocalSwarm(1).averager(0), object())


# --- 2 workers x 2 ranks over the real swarm ---
def daemons_tagged(tag: str) -> list[int]:
    """The p2pd daemons started with ``tag`` in their environment (inherited from
    the nodes of this run; not those of other tests running on the machine)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "p2pd" and \
                    tag.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:  # gone, or not ours to read
            pass
    return found


def assert_daemons_gone(tag: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while daemons_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not daemons_tagged(tag), "a p2pd daemon outlived its node"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Run the 4 ranks once; each rank's results by global rank (0, 1: worker 0)."""
    out = tmp_path_factory.mktemp("worker_group")
    tag = f"LOWCOMM_WORKER_GROUP_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           tag.split("=")[0]: tag.split("=")[1]}
    cmd = [sys.executable, "-m", "tests.optimizers.group_node", "--world", "4", "--store", str(out / "store"),
           "--out", str(out)]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for r in range(4)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert_daemons_gone(tag)
    for stdout, _ in outputs:
        print(stdout.strip())  # per-scenario seconds, shown with -s
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]
    return {"ranks": results, "shared_w0": torch.load(out / "shared_w0.pt", weights_only=True)}


def reference(build, steps):
    """2 single-process workers on a LocalSwarm, each on its ranks' batches
    concatenated: [(opt, model)] by worker."""
    def run(worker, averager):
        model = make_model(0)
        opt = build(model, averager)
        train(model, opt, lambda t: global_batch(worker, t), steps)
        return opt, model
    return LocalSwarm(2).run(run)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def diloco_reference():
    return reference(lambda m, a: DiLoCo(m.parameters(), adamw(m), a, sync_every=H), 3 * H)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def assert_all_equal(tensor_lists):
    assert all(all(torch.equal(x, y) for x, y in zip(tensor_lists[0], t)) for t in tensor_lists[1:])


def butterfly_bytes(numel: int, codec=NONE) -> int:
    """Payload bytes one member of a group of 2 sends per round for ``numel``
    values: the other member's shard, then the mean of its own (both shards)."""
    return sum(wire_size(codec, b - a) for a, b in shard_bounds(numel, 2))


def envelopes(bytes_sent: int, numel: int, rounds: int = 3) -> int:
    """What the real swarm sent beyond ``rounds`` rounds of payloads of ``numel``
    values: the part messages' envelopes (run, key, round, contributors), under
    400 bytes per message, 2 messages a round; -1 if outside that."""
    extra = bytes_sent - rounds * butterfly_bytes(numel)
    return extra if 0 < extra <= rounds * 2 * 400 else -1


def test_split_workers_equal_single_process_workers_and_send_half(nodes, diloco_reference):
    ranks = [r["split"] for r in nodes["ranks"]]
    for g, r in enumerate(ranks):
        ref_opt, _ = diloco_reference[g // 2]
        assert r["rounds"] == 3 and r["not_averaged"] == 0 and r["group"] == 2
        assert max_diff(r["phi"], ref_opt.global_params) <= 1e-6
        assert all(torch.equal(t, p) for t, p in zip(r["theta"], r["phi"]))   # theta = phi after a round
    assert_all_equal([r["phi"] for r in ranks])  # every rank of every worker, bit for bit
    # bytes: rank 0 averages values [0, 10241), rank 1 [10241, 20481); a single-process worker all
    # 20481 (on a LocalSwarm: payloads alone; rank0 mode's rank 0: the same over the real swarm)
    assert diloco_reference[0][0].stats.bytes_sent == 3 * butterfly_bytes(NUMEL)
    single = nodes["ranks"][0]["rank0"]["bytes_sent"]
    assert envelopes(single, NUMEL) > 0
    for g, r in enumerate(ranks):
        lo, hi = slice_bounds(NUMEL, 2)[g % 2]
        assert (lo, hi) == [(0, 10_241), (10_241, NUMEL)][g % 2]
        assert envelopes(r["bytes_sent"], hi - lo) > 0   # the slice's payloads exactly, plus envelopes
        assert abs(r["bytes_sent"] / single - (hi - lo) / NUMEL) < 0.005   # about half: 0.500 and 0.500


def test_noloco_and_data_parallel_split_equal_single_process_workers(nodes):
    noloco = reference(lambda m, a: NoLoCo(m.parameters(), adamw(m), a, sync_every=H), 2 * H)
    ddp = reference(lambda m, a: DataParallel(m.parameters(), adamw(m), a), 3)
    for g, r in enumerate(nodes["ranks"]):
        assert r["noloco"]["rounds"] == 2 and r["noloco"]["not_averaged"] == 0
        assert max_diff(r["noloco"]["phi"], noloco[g // 2][0].global_params) <= 1e-6
        assert r["ddp"]["rounds"] == 3 and r["ddp"]["not_averaged"] == 0
        assert max_diff(r["ddp"]["phi"], list(ddp[g // 2][1].parameters())) <= 1e-6
    assert_all_equal([r["noloco"]["phi"] for r in nodes["ranks"]])
    assert_all_equal([r["ddp"]["phi"] for r in nodes["ranks"]])


def test_dgc_split_gathers_what_was_sent_and_equals_single_process_workers(nodes):
    """Top-k chunks of 64: the slices (10,304 and 10,177 values) are cut at chunk
    multiples, so each rank picks what a single worker picks there; the local
    accumulation is cleared where the gathered ``sent`` says (u: zero exactly
    there; v: what fp16 values left, so within an fp16 rounding)."""
    ref = reference(lambda m, a: CompressedDataParallel(m.parameters(), adamw(m), a, dgc_codec(),
                                                         momentum_correction=True, momentum=0.0), 3)
    for g, r in enumerate(nodes["ranks"]):
        opt, model = ref[g // 2]
        assert r["dgc"]["rounds"] == 3 and r["dgc"]["not_averaged"] == 0
        assert max_diff(r["dgc"]["phi"], list(model.parameters())) <= 1e-6
        assert all(torch.equal(a == 0, b == 0) for a, b in zip(r["dgc"]["u"], opt.u))
        assert sum(int((u == 0).sum()) for u in opt.u) >= NUMEL // 8      # k = 8 of every 64 sent
        assert max_diff(r["dgc"]["v"], opt.v) <= 1e-4
    assert_all_equal([r["dgc"]["phi"] for r in nodes["ranks"]])


def test_resume_from_state_dict_is_bitwise(nodes):
    for r in nodes["ranks"]:
        full, cut = r["resume_full"], r["resume_cut"]
        assert full["rounds"] == cut["rounds"] == 4 and full["not_averaged"] == 0
        assert all(torch.equal(a, b) for a, b in zip(full["phi"], cut["phi"]))
        assert all(torch.equal(a, b) for a, b in zip(full["theta"], cut["theta"]))
        assert full["bytes_sent"] == cut["bytes_sent"] > 0
        (a,), (b,) = full["residuals"].values(), cut["residuals"].values()   # one slice key per rank
        assert torch.equal(a, b) and a.abs().sum() > 0
    # error feedback per slice: 481 values in 64-value chunks -> slices of 256 and 225 values
    sizes = [{k.rsplit("/", 1)[-1]: v.numel() for k, v in r["resume_full"]["residuals"].items()}
             for r in nodes["ranks"]]
    assert sizes == [{"part0of2": 10_304}, {"part1of2": 10_177}] * 2
    assert_all_equal([r["resume_full"]["phi"] for r in nodes["ranks"]])


def test_catch_up_broadcasts_one_state_to_every_rank_bitwise(nodes):
    source = nodes["shared_w0"]
    assert source["step"] == 3 * H and source["rounds"] == [3]
    for r in nodes["ranks"][2:]:  # worker 1 started anew (another initialisation) and caught up
        loaded = r["catchup_loaded"]
        assert loaded["step"] == source["step"] and loaded["rounds"] == source["rounds"]
        assert all(torch.equal(a, b) for a, b in zip(loaded["phi"][0], source["phi"][0]))
        assert loaded["outer"][0]["state"].keys() == source["outer"][0]["state"].keys()
        for k, s in source["outer"][0]["state"].items():
            assert torch.equal(loaded["outer"][0]["state"][k]["momentum_buffer"], s["momentum_buffer"])
        assert all(torch.equal(t, p) for t, p in zip(r["catchup_theta"], source["phi"][0]))
    after = [r["catchup_after"] for r in nodes["ranks"]]
    assert all(a["not_averaged"] == 0 for a in after)
    assert_all_equal([a["phi"] for a in after])  # one more round together: every rank alike


def test_rank0_mode_equals_single_process_and_only_rank0_sends(nodes, diloco_reference):
    ranks = [r["rank0"] for r in nodes["ranks"]]
    for g, r in enumerate(ranks):
        assert r["rounds"] == 3 and r["not_averaged"] == 0 and r["group"] == 2
        assert max_diff(r["phi"], diloco_reference[g // 2][0].global_params) <= 1e-6
        assert (envelopes(r["bytes_sent"], NUMEL) > 0) if g % 2 == 0 else r["bytes_sent"] == 0
    assert_all_equal([r["phi"] for r in ranks])


def test_fsdp2_sharded_workers_equal_single_process_workers(nodes, diloco_reference):
    ranks = [r["sharded"] for r in nodes["ranks"]]
    for g, r in enumerate(ranks):
        assert r["rounds"] == 3 and r["not_averaged"] == 0 and r["group"] == 2
        assert max_diff(r["phi"], diloco_reference[g // 2][0].global_params) <= 1e-6
        # each rank syncs its own shards: Shard(0) of [2048, 8], [2048], [1, 2048], [1] over 2 ranks
        assert r["local"] == ([8192, 1024, 2048, 1] if g % 2 == 0 else [8192, 1024, 0, 0])
        assert envelopes(r["bytes_sent"], sum(r["local"])) > 0
    assert_all_equal([r["phi"] for r in ranks])


def test_a_rank_with_an_empty_slice_takes_part_in_the_gathers(nodes):
    tiny = [r["tiny"] for r in nodes["ranks"]]
    want = torch.arange(10, dtype=torch.float32) * 1.5   # mean of x and 2x
    for g, t in enumerate(tiny):
        assert t["averaged"] and t["participants"] == 2 and t["shards_averaged"] == [True, True]
        assert (t["value"] - want).abs().max().item() <= 2 * 18 / 254   # two int8 roundings of |x| <= 18
        assert (t["bytes_sent"] > 0) == (g % 2 == 0)                      # rank 1 had nothing to send
    assert_all_equal([[t["value"]] for t in tiny])


def test_ranks_that_disagree_on_the_parameters_refuse_alike(nodes):
    messages = [r["mismatch"] for r in nodes["ranks"][:2]]
    assert messages[0] == messages[1]
    assert "disagree on params" in messages[0] and "same model" in messages[0]
