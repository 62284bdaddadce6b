"""The ranks of one `lowcomm join --nproc-per-node G` node: a worker of G processes.

`lowcomm.join.launch` starts G rank processes on the machine; each runs a
`lowcomm.join.node.Node` with a `RankGroup`, its handle on the others (a gloo
process group over 127.0.0.1, on CPU; on GPUs the model's tensors are moved
by the task, the group's own traffic is a few small tensors per step and one
gradient vector).

What a worker of G ranks does, rank by rank:

- **Model and data.** Every rank builds the same model from ``--seed``. Rank
  r reads ``task.batches(r, G, order)``, ``order`` derived from the node's
  peer id (rank 0's) as a single-process node's is, so the worker's batch is
  G of the task's batches (G micro-batches; ``--batch-size`` is per rank).
  After each backward the ranks average their gradients (`RankGroup.step`:
  one all-reduce of the flattened gradients, divided by G: DDP's gradient
  mean, without its overlap with the backward pass), so every rank takes the
  same inner step and holds the same weights, bit for bit.
- **Outer sync.** Each rank's outer optimizer has ``worker_group=`` the
  group (`lowcomm.optimizers.worker_group`, mode ``split``): rank r averages
  slice r of each exchange in its own swarm, the slot ``part{r}of{G}``.
- **Identity.** Rank 0 is the node: its key file is the node's
  (``--identity``, or ``<checkpoint-dir>/identity.key``), its peer id is the
  one the join line prints. Rank r > 0's key file, ``identity.rank{r}.key``
  beside it (`rank_identity`), is derived from the node's key file on its
  first start (`lowcomm.p2p.keys.derive_key_file`: an RSA key, which
  hivemind's daemon takes, whose primes come from a hash of the node's key
  and the rank), so the node's one key file decides every rank's peer id.
- **Addresses.** Rank r listens on the node's ``--listen`` port + r (0 stays
  0: any free port) and announces ``--announce``'s port + r. Every rank
  joins the same DHT: rank 0 bootstraps from ``--peers``, ranks r > 0 from
  their own rank 0 and ``--peers``; each slot's swarm is its own ``run_id``
  in that DHT, so one printed multiaddr is enough for every rank of a joiner.
- **Handshake and state.** Only rank 0 greets bootstrap peers, serves hellos
  and state, and catches up: it downloads a peer's shared state and
  `broadcast_shared_state` loads it on every rank. G is part of the run
  settings (``ranks_per_worker``): slices of workers of different G do not
  pair, so a node of another G is refused by the handshake, naming it.
- **Stopping.** A stop request is agreed at the next step (`step` carries
  each rank's flag in the gradient all-reduce), so every rank leaves the
  loop at the same step, saves its checkpoint (``node-rank{r}.*``) and leaves
  its swarm.
- **Output.** Rank 0 prints the status line for the worker as a unit
  (bytes summed over the ranks); the other ranks print nothing but errors.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

#: How long a rank waits in a collective for the others (rank 0 may wait for
#: ``--wait-for`` nodes, or catch up, while the others wait for its word).
GROUP_TIMEOUT = timedelta(hours=24)


def with_port(maddr: str, offset: int) -> str:
    """``maddr`` with its TCP port raised by ``offset`` (a port 0, any free one, stays 0)."""
    def bump(m: re.Match) -> str:
        port = int(m.group(1))
        return f"/tcp/{port + offset if port else 0}"
    return re.sub(r"/tcp/(\d+)", bump, maddr, count=1)


def rank_identity(node_key: Path, rank: int) -> Path:
    """The key file of rank ``rank`` (> 0) of the node whose key file is
    ``node_key``: ``identity.rank{r}.key`` beside it (its key is derived from
    ``node_key``, `lowcomm.p2p.keys.derive_key_file`)."""
    return node_key.with_name(f"{node_key.stem}.rank{rank}{node_key.suffix}")


class RankGroup:
    """This rank's view of its node's G ranks (see the module docstring).

    Args:
        rank: this process's rank, 0..size-1.
        size: G, the node's ranks.
        port: the TCP port on 127.0.0.1 of the group's rendezvous (the launcher picks a free one).
    """

    def __init__(self, rank: int, size: int, port: int):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                timeout=GROUP_TIMEOUT)
        self.rank, self.size = rank, size
        self.pg = dist.group.WORLD

    @property
    def lead(self) -> bool:
        """Whether this is rank 0: the node's voice (status lines, handshake, catch-up)."""
        return self.rank == 0

    def broadcast_json(self, obj=None):
        """Rank 0's ``obj`` (JSON-able) on every rank; a collective."""
        data = torch.tensor(list(json.dumps(obj).encode()) if self.lead else [], dtype=torch.uint8)
        size = torch.tensor([data.numel()])
        dist.broadcast(size, 0)
        if not self.lead:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0)
        return obj if self.lead else json.loads(bytes(data.tolist()))

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64); a collective."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather_json(self, obj) -> list:
        """``obj`` (JSON-able) of every rank, in rank order; a collective."""
        out: list = [None] * self.size
        data = json.dumps(obj).encode()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([len(data)]))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(bufs, padded)
        for r, (b, s) in enumerate(zip(bufs, sizes)):
            out[r] = json.loads(bytes(b[:int(s.item())].tolist()))
        return out

    @torch.no_grad()
    def step(self, model: nn.Module, stop: bool) -> bool:
        """Average the gradients of ``model`` over the ranks (sum of one all-reduce,
        divided by G: the same values on every rank) and say whether any rank asked
        to stop (``stop``: this rank's request). A collective, once per inner step."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float().cpu() for g in grads] + [torch.tensor([float(stop)])])
        dist.all_reduce(flat)
        start = 0
        for g in grads:
            g.copy_((flat[start:start + g.numel()] / self.size).view_as(g))
            start += g.numel()
        return bool(flat[-1].item() > 0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
