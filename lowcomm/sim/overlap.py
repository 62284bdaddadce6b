"""DDP's gradient all-reduce overlapping the backward pass, bucket by bucket.

torch's DistributedDataParallel does not wait for the whole backward pass: it
groups gradients into buckets and all-reduces each bucket as soon as the
backward pass has produced all of its gradients, while the rest of the
backward pass still runs. This module models that, for `lowcomm simulate`
(`NetworkModel.pipeline`) and `lowcomm plan` (`lowcomm.sim.plan.predict`):

- **Buckets, as torch builds them** (torch/nn/parallel/distributed.py and
  c10d's ``compute_bucket_assignment_by_size``, torch 2.13): parameters in
  reverse model order (the order a model used in definition order produces
  its gradients; DDP rebuilds its buckets in that observed order after the
  first iteration), fp32 gradients; a bucket closes with the parameter that
  brings it to or past its cap: ``dist._DEFAULT_FIRST_BUCKET_BYTES`` (1 MiB)
  for the first, ``bucket_cap_mb=25`` (``_DEFAULT_BUCKET_CAP_MB``, MiB) for
  the rest. A model below 1 MiB of gradients is one bucket.
- **Ready times.** The backward pass takes ``backward_share`` of the step's
  compute and produces gradients at a constant rate per parameter value
  (an assumption: real layers differ in cost per value): a bucket is ready
  when the share of all values in it and the buckets before it has been
  produced.
- **One link, collectives in sequence.** A bucket's all-reduce starts when
  it is ready on every member and the previous bucket's has arrived, and takes
  the network model's time for the exchange DDP uses today (butterfly of that
  bucket's values through the codec, `exchange_phases`: each bucket is a
  payload of its own).
- **The update waits** for the last bucket: a step takes its compute plus
  the stall, the time by which the last arrival is later than the end of the
  backward pass. With one bucket nothing starts before the backward pass
  ends, as without overlap.

The forward pass, loss and optimizer step take the rest of the step. Where
they fall in it does not change the stall (every step is alike), so the
simulator counts the whole step's compute before the exchange and lets the
backward pass end when the worker hands its gradients to the averager.
"""

from __future__ import annotations

from typing import Sequence

from lowcomm.compressors import Compressor, get_compressor
from lowcomm.sim.network import Network, Transfer, WorkerClock, exchange_phases, settle

#: torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: the first bucket's cap (bytes).
FIRST_BUCKET_BYTES = 1024 * 1024
#: DistributedDataParallel's default bucket_cap_mb (_DEFAULT_BUCKET_CAP_MB = 25, MiB): every later bucket's cap.
BUCKET_BYTES = 25 * 1024 * 1024
#: Bytes per gradient value (fp32).
GRAD_BYTES = 4
#: Share of a step's compute that is the backward pass when it is not measured:
#: the backward pass does twice the forward's FLOPs (4N of the 6N per token of
#: Kaplan et al. 2020), and the optimizer step, O(parameters) rather than
#: O(tokens), is small beside both at useful batch sizes.
DEFAULT_BACKWARD_SHARE = 2 / 3


class BackwardShareError(ValueError):
    """A ``--backward-share`` that is neither 'auto' nor a number in [0, 1]."""


def parse_backward_share(text: str) -> float | None:
    """``"auto"`` -> None (measured, or `DEFAULT_BACKWARD_SHARE`); ``"0.6"`` -> 0.6."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise BackwardShareError(f"must be 'auto' or a number in [0, 1] (the backward pass's share of a step), "
                                 f"got {text!r}")
    return value


def ddp_buckets(numels: Sequence[int], first_cap: int = FIRST_BUCKET_BYTES,
                cap: int = BUCKET_BYTES) -> list[list[int]]:
    """The parameters (indices in model order) of each of DDP's buckets, in the
    order their all-reduces run; ``numels`` are the parameters' sizes in model
    order, ``first_cap`` and ``cap`` in bytes (see the module doc)."""
    buckets: list[list[int]] = []
    current, size = [], 0
    for i in reversed(range(len(numels))):
        current.append(i)
        size += numels[i] * GRAD_BYTES
        if size >= (cap if buckets else first_cap):
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def bucket_numels(numels: Sequence[int]) -> list[int]:
    """Values per DDP bucket, in the order their all-reduces run."""
    return [sum(numels[i] for i in b) for b in ddp_buckets(numels)]


def filled_buckets(params: int) -> list[int]:
    """Values per bucket of a model known only by its size: every bucket full
    to its cap (parameters small beside 25 MiB), the last with the rest."""
    out, left = [], params
    while left > 0:
        take = min(left, (BUCKET_BYTES if out else FIRST_BUCKET_BYTES) // GRAD_BYTES)
        out.append(take)
        left -= take
    return out


class BucketedAllReduce:
    """The bucket all-reduces of one step whose backward pass takes ``backward``
    seconds, as `settle` transfers. ``buckets``: values per bucket in the order
    their all-reduces run (`bucket_numels`, `filled_buckets`); ``codec``: what
    the gradients travel as (fp32, ``none``, for DDP)."""

    def __init__(self, buckets: Sequence[int], backward: float, codec: Compressor | None = None):
        if not buckets or min(buckets) < 0 or backward < 0:
            raise ValueError(f"need buckets of >= 0 values and a backward pass of >= 0 s, got {list(buckets)}, "
                             f"{backward}")
        self.buckets, self.backward = list(buckets), backward
        self.codec = codec or get_compressor("none")
        self._phases: dict[int, list[list]] = {}  # group size -> phases per bucket

    def transfers(self, ready: float, group: int) -> list[Transfer]:
        """(ready at, phases) of each bucket's all-reduce in a group of ``group``
        whose backward passes had all ended by ``ready`` (seconds)."""
        if group not in self._phases:
            self._phases[group] = [exchange_phases(self.codec, b, group) for b in self.buckets]
        total, done, out = sum(self.buckets), 0, []
        for numel, phases in zip(self.buckets, self._phases[group]):
            done += numel
            out.append((ready - self.backward * (total - done) / max(total, 1), phases))
        return out


def ddp_step_time(numels: Sequence[int], step_time: float, backward_share: float, network: Network, group: int,
                  codec: Compressor | None = None) -> tuple[float, float]:
    """(wall seconds of one DDP step, stall seconds) in steady state, for
    parameters of ``numels`` values (model order), ``step_time`` seconds of
    compute of which ``backward_share`` is the backward pass, in a group of
    ``group`` over ``network``. The stall is what the last bucket's arrival
    adds to the compute (see the module doc)."""
    if not 0.0 <= backward_share <= 1.0:
        raise ValueError(f"backward_share must be in [0, 1], got {backward_share}")
    clock = WorkerClock(now=step_time, compute=step_time)
    if group < 2:
        return step_time, 0.0
    allreduce = BucketedAllReduce(bucket_numels(numels), backward_share * step_time, codec)
    stall = settle(clock, network, allreduce.transfers(step_time, group), 0)
    return clock.now, stall
