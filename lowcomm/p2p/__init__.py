"""The real swarm: membership, matchmaking and group averaging over a Transport.

Backends are imported lazily by name (`lowcomm.p2p.backends`): hivemind and
py-libp2p cannot live in one process.
"""

from lowcomm.p2p.memory import MemoryNetwork, MemoryTransport
from lowcomm.p2p.private import PrivateTransport, Unauthorized
from lowcomm.p2p.swarm import Swarm, SwarmHandle
from lowcomm.p2p.transport import BootstrapFailed, PeerUnreachable, Transport, TransportError

__all__ = ["BootstrapFailed", "MemoryNetwork", "MemoryTransport", "PeerUnreachable", "PrivateTransport", "Swarm",
           "SwarmHandle", "Transport", "TransportError", "Unauthorized"]
