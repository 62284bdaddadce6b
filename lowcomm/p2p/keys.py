"""Identity key files derived from another one: the ranks of a node.

A node of G ranks (`lowcomm join --nproc-per-node G`) is G swarm members,
each with a peer id of its own. Rank 0's key file is the node's; rank r's is
derived from it, so the node's one key file decides every rank's peer id (a
node moved to another machine with its key keeps its ranks' ids too):

    derive_key_file(Path("identity.key"), Path("identity.rank1.key"), "rank1")

The derived key is an RSA-2048 key, the kind hivemind's daemon makes and
accepts (its identity check reads RSA keys only; py-libp2p reads them too),
in libp2p's ``PrivateKey`` protobuf form. Its primes come from SHA-256 in
counter mode over a seed, itself the SHA-256 of a label and the parent
file's bytes: the same parent and label give the same key, bit for bit, and
nobody without the parent file can compute it. Primes are tested with 64
rounds of Miller-Rabin (error below 2^-128).

Depends on ``cryptography`` (installed with hivemind) for the DER encoding;
imports neither backend.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

RSA_BITS = 2048
_E = 65537
_DOMAIN = b"lowcomm/derived-identity/1\0"
_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


class _Stream:
    """Bytes of SHA-256 in counter mode over ``seed``."""

    def __init__(self, seed: bytes):
        self.seed, self.counter = seed, 0

    def take(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return out[:n]

    def below(self, n: int) -> int:
        """An integer in [2, n - 2] (for Miller-Rabin bases)."""
        return 2 + int.from_bytes(self.take((n.bit_length() + 7) // 8 + 8), "big") % (n - 3)


def _probably_prime(n: int, stream: _Stream, rounds: int = 64) -> bool:
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(stream.below(n), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(stream: _Stream, bits: int) -> int:
    """The first prime p of ``bits`` bits (the top two set, so p*q has 2*bits) drawn
    from ``stream`` with gcd(e, p - 1) = 1."""
    while True:
        p = int.from_bytes(stream.take(bits // 8), "big") | (3 << (bits - 2)) | 1
        if (p - 1) % _E and _probably_prime(p, stream):
            return p


def rsa_key_from_seed(seed: bytes) -> rsa.RSAPrivateKey:
    """The RSA-2048 key determined by ``seed`` (see the module docstring)."""
    stream = _Stream(hashlib.sha256(_DOMAIN + seed).digest())
    p = _prime(stream, RSA_BITS // 2)
    q = _prime(stream, RSA_BITS // 2)
    while q == p:
        q = _prime(stream, RSA_BITS // 2)
    p, q = max(p, q), min(p, q)
    d = pow(_E, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                    rsa.RSAPublicNumbers(_E, p * q))
    return numbers.private_key()


def key_file_bytes(key: rsa.RSAPrivateKey) -> bytes:
    """``key`` as libp2p's ``PrivateKey`` protobuf (type RSA = 0, data = PKCS#1 DER), the
    bytes hivemind's daemon writes for its own keys."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    size, varint = len(der), b""
    while True:
        byte, size = size & 0x7F, size >> 7
        varint += bytes([byte | (0x80 if size else 0)])
        if not size:
            break
    return b"\x08\x00\x12" + varint + der


def derive_key_file(parent: Path, child: Path, label: str) -> Path:
    """Write ``child`` (unless it exists): the key derived from the file ``parent`` and
    ``label``; written whole or not at all. Returns ``child``. `FileNotFoundError`
    if ``parent`` is missing."""
    if child.exists():
        return child
    seed = label.encode() + b"\0" + parent.read_bytes()
    tmp = child.with_name(f".{child.name}.{os.getpid()}.tmp")
    tmp.write_bytes(key_file_bytes(rsa_key_from_seed(seed)))
    tmp.chmod(0o600)
    os.replace(tmp, child)
    return child
