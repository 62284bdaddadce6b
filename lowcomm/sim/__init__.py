"""One-machine simulation: an in-process swarm through the real codecs."""

from lowcomm.sim.swarm import LocalAverager, LocalSwarm

__all__ = ["LocalAverager", "LocalSwarm"]
