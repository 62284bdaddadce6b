"""Outer optimizers: torch optimizer wrappers that talk to an `Averager`."""

from lowcomm.optimizers.base import OuterOptimizer, Stats
from lowcomm.optimizers.data_parallel import CompressedDataParallel, DataParallel
from lowcomm.optimizers.diloco import DiLoCo, StreamingDiLoCo
from lowcomm.optimizers.noloco import NoLoCo
from lowcomm.optimizers.sparseloco import SparseLoCo
from lowcomm.optimizers.worker_group import WorkerGroupAverager, broadcast_shared_state

__all__ = ["CompressedDataParallel", "DataParallel", "DiLoCo", "NoLoCo", "OuterOptimizer", "SparseLoCo", "Stats",
           "StreamingDiLoCo", "WorkerGroupAverager", "broadcast_shared_state"]
