"""One spec per outer algorithm: its name, what it does, its defaults, how it
is built and when it exchanges what. `lowcomm simulate`, `lowcomm plan`,
`lowcomm join` and `build_optimizer` all look algorithms up here, so an
algorithm is one class plus one `AlgorithmSpec`.

    spec = get_algorithm("streaming")
    s = spec.settings({"sync_every": 40})          # the class's own defaults for the rest
    opt = spec.build(s, model.named_parameters(), inner, averager)

Defaults live in one place: the optimizer class's constructor. A spec names
which constructor arguments a run may set (``options``) and reads their
defaults from the signature; the only default a spec adds is ``sync_every``
for command-line runs (H), which the constructors leave to the caller's
loop length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lowcomm.averaging import shard_bounds
from lowcomm.compressors import Compressor, get_compressor

from lowcomm.optimizers.base import OuterOptimizer, Params
from lowcomm.optimizers.data_parallel import CompressedDataParallel, DataParallel
from lowcomm.optimizers.diloco import DiLoCo, StreamingDiLoCo, auto_fragments
from lowcomm.optimizers.noloco import NoLoCo
from lowcomm.optimizers.sparseloco import SparseLoCo


@dataclass
class Settings:
    """The resolved settings of one algorithm in one run: ``sync_every`` (H,
    inner steps between exchanges of a fragment) and the constructor arguments
    in ``options`` (every one filled in, defaults included)."""

    algorithm: str
    sync_every: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fragments(self) -> int:
        """P; for Streaming DiLoCo's automatic choice (None), the count a model
        with enough parameter units gets (the optimizer also caps it by units)."""
        p = self.options.get("fragments", 1)
        return auto_fragments(self.sync_every, delay=self.delay) if p is None else p

    @property
    def delay(self) -> int:
        return self.options.get("delay", 0)

    @property
    def compressor(self) -> str:
        return self.options.get("compressor") or "none"

    @property
    def group_size(self) -> int | None:
        return self.options.get("group_size")


@dataclass(frozen=True)
class SyncSchedule:
    """When one worker exchanges what: every ``every`` inner steps, fragment i
    (``numels[i]`` values) is sent at step offset ``offsets[i]`` and its mean is
    needed ``delay`` steps later, in groups of ``group`` through ``compressor``.
    ``overlap_backward``: the exchange is DDP's gradient all-reduce, which runs
    bucket by bucket during the backward pass (`lowcomm.sim.overlap`)."""

    every: int
    numels: list[int]
    offsets: list[int]
    delay: int
    group: int
    compressor: Compressor
    overlap_backward: bool = False


@dataclass(frozen=True)
class AlgorithmSpec:
    """An outer algorithm as the command line knows it.

    ``options``: constructor arguments a run may set (defaults from the
    signature); ``fixed``: constructor arguments this algorithm gets unless a
    run sets them (where they are ``options``), replacing the signature's;
    ``sync_every``: H of command-line runs (None: exchanges every step);
    ``codec``: the codec on the wire for given constructor
    arguments (default: the ``compressor`` argument by name);
    ``overlaps_backward``: its every-step exchange is torch DDP's bucketed
    gradient all-reduce, which starts during the backward pass.
    """

    name: str
    summary: str
    cls: type
    options: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    sync_every: int | None = None
    codec: Callable[[dict], Compressor] | None = None
    overlaps_backward: bool = False

    @property
    def copies(self) -> int:
        """Parameter-sized tensors per exchange (NoLoCo sends phi and theta - phi):
        the optimizer's `OuterOptimizer.exchange_copies`."""
        return self.cls.exchange_copies

    @property
    def periodic(self) -> bool:
        """Whether it exchanges every H steps (an outer algorithm), not every step."""
        return self.sync_every is not None

    def ignored(self, given: Mapping[str, Any]) -> list[str]:
        """The settings in ``given`` (not None) that this algorithm does not take."""
        takes = set(self.options) | ({"sync_every"} if self.periodic else set())
        return sorted(k for k, v in given.items() if v is not None and k not in takes)

    def defaults(self) -> dict[str, Any]:
        """The constructor's defaults of ``options``, then ``fixed``."""
        sig = _constructor_defaults(self.cls)
        out = {**{k: sig.get(k, inspect.Parameter.empty) for k in self.options}, **self.fixed}
        for k, v in out.items():
            if v is inspect.Parameter.empty:
                raise TypeError(f"{self.cls.__name__}.{k} has no default; give it one or put it in `fixed`")
        return out

    def settings(self, given: Mapping[str, Any] | None = None) -> Settings:
        """Settings from ``given`` (None or a missing key: the default). Keys
        this algorithm does not take are ignored (one config serves all)."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        options = self.defaults()
        options.update({k: v for k, v in given.items() if k in self.options})
        sync = 1 if self.sync_every is None else given.get("sync_every") or self.sync_every
        if "sync_every" in _constructor_defaults(self.cls):
            options["sync_every"] = sync
        return Settings(self.name, sync, options)

    def build(self, s: Settings, params: Params, inner, averager, worker_group=None,
              worker_group_mode: str = "split") -> OuterOptimizer:
        """The optimizer ``s`` describes; ``worker_group`` (a process group) for a
        worker of several processes (`lowcomm.optimizers.worker_group`)."""
        return self.cls(params, inner, averager, **s.options, worker_group=worker_group,
                        worker_group_mode=worker_group_mode)

    def schedule(self, s: Settings, params: int, workers: int,
                 fragment_numels: list[int] | None = None) -> SyncSchedule:
        """The exchanges of one worker training a model of ``params`` values
        among ``workers`` (fragments split evenly unless ``fragment_numels``)."""
        group = min(workers, s.group_size or workers)
        codec = self.codec(s.options) if self.codec else get_compressor(s.compressor)
        if self.sync_every is None:
            return SyncSchedule(1, [params], [0], 0, group, codec, overlap_backward=self.overlaps_backward)
        numels = fragment_numels or [hi - lo for lo, hi in shard_bounds(params * self.copies, s.fragments)]
        offsets = [p * s.sync_every // len(numels) for p in range(len(numels))]
        return SyncSchedule(s.sync_every, numels, offsets, s.delay, group, codec)


def _constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults of ``cls(...)``, a subclass's over its bases' (for
    constructors that pass ``**kwargs`` on)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self":
                    out[name] = p.default
    return out


_OUTER = ("outer_lr", "outer_momentum", "compressor", "error_feedback", "group_size")

ALGORITHMS: dict[str, AlgorithmSpec] = {s.name: s for s in (
    AlgorithmSpec("ddp", "data-parallel baseline: fp32 gradient mean every step", DataParallel,
                  overlaps_backward=True),
    # DGC's local accumulation and factor masking with the momentum left to the inner optimizer (AdamW's
    # beta1): a correction momentum of its own on top stacks two (terrain: 0.058 against 0.027, codeclass
    # 1.407 against 1.394; docs/results.md).
    # Unlike ddp's, its exchange does not overlap the backward pass: the accumulation and top-k run over the
    # whole flat gradient after it, in chunks that cross parameters, so no bucket could leave earlier.
    AlgorithmSpec("dgc", "compressed data-parallel: top-k gradients accumulated locally (Deep Gradient "
                  "Compression)", CompressedDataParallel, ("compressor",),
                  fixed={"compressor": "topk", "momentum_correction": True, "momentum": 0.0}),
    AlgorithmSpec("diloco", "DiLoCo: Nesterov outer step on the group mean of phi - theta every H steps",
                  DiLoCo, _OUTER, sync_every=20),
    AlgorithmSpec("streaming", "Streaming DiLoCo: fragments at staggered steps, fp4, overlapped exchange",
                  StreamingDiLoCo, _OUTER + ("fragments", "delay", "alpha"), sync_every=20),
    AlgorithmSpec("noloco", "NoLoCo: gossip in random groups, each worker its own slow weights",
                  NoLoCo, _OUTER, sync_every=20),
    AlgorithmSpec("sparseloco", "SparseLoCo: top-k outer gradients with 2-bit values and error feedback, plain "
                  "outer SGD", SparseLoCo, ("outer_lr", "group_size", "density", "chunk_size", "beta"),
                  sync_every=20, codec=SparseLoCo.wire_codec),
)}


def get_algorithm(name: str) -> AlgorithmSpec:
    spec = ALGORITHMS.get(name)
    if spec is None:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    return spec


def settings_for(name: str, given: Mapping[str, Any] | None = None) -> Settings:
    """``name``'s settings: what ``given`` sets (None: default), the class's defaults for the rest."""
    return get_algorithm(name).settings(given)


def build_optimizer(s: Settings, model, inner, averager, worker_group=None,
                    worker_group_mode: str = "split") -> OuterOptimizer:
    """The outer optimizer ``s`` describes, over ``model``'s named parameters
    (``worker_group``: see `AlgorithmSpec.build`)."""
    return get_algorithm(s.algorithm).build(s, list(model.named_parameters()), inner, averager,
                                            worker_group=worker_group, worker_group_mode=worker_group_mode)
