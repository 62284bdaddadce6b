"""The network lab: real nodes in network namespaces on kernel-shaped links.

`lowcomm.lab.netns` makes the namespaces and links, `lowcomm.lab.probe`
times one transfer through a real transport, `lowcomm.lab.ddp` is torch's own
DistributedDataParallel on a task (the lab's reference), and
``scripts/wanlab.py`` runs it all and compares it with `lowcomm simulate`.
Linux and root only.
"""

from lowcomm.lab.netns import LabError, NetLab, mbit, remove_stale, support_problem

__all__ = ["LabError", "NetLab", "mbit", "remove_stale", "support_problem"]
