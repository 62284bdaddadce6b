"""Key files derived from a node's: the same parent and label give the same key,
one hivemind reads as RSA, and nothing half-written."""

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from lowcomm.p2p.keys import derive_key_file, key_file_bytes, rsa_key_from_seed


def test_a_seed_gives_one_rsa_2048_key_whose_numbers_hold():
    key = rsa_key_from_seed(b"node key bytes")
    assert key_file_bytes(rsa_key_from_seed(b"node key bytes")) == key_file_bytes(key)
    assert key_file_bytes(rsa_key_from_seed(b"node key byteS")) != key_file_bytes(key)
    n = key.private_numbers()
    assert key.key_size == 2048 and n.public_numbers.e == 65537
    assert n.p * n.q == n.public_numbers.n and n.p != n.q
    assert (n.d * 65537) % ((n.p - 1) * (n.q - 1)) == 1
    assert pow(pow(12345, 65537, n.public_numbers.n), n.d, n.public_numbers.n) == 12345


def test_the_file_is_libp2ps_private_key_protobuf():
    blob = key_file_bytes(rsa_key_from_seed(b"x"))
    # field 1 (key type) = 0 (RSA), field 2 (data): varint length, then the DER
    assert blob[:3] == b"\x08\x00\x12"
    length, shift, i = 0, 0, 3
    while True:
        length |= (blob[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not blob[i - 1] & 0x80:
            break
    assert len(blob) == i + length


def test_derived_files_follow_the_parent_and_the_label(tmp_path):
    parent = tmp_path / "identity.key"
    parent.write_bytes(key_file_bytes(rsa.generate_private_key(65537, 2048)))
    a = derive_key_file(parent, tmp_path / "a.key", "rank1").read_bytes()
    again = derive_key_file(parent, tmp_path / "again.key", "rank1").read_bytes()
    other = derive_key_file(parent, tmp_path / "other.key", "rank2").read_bytes()
    assert a == again and a != other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "again.key", "identity.key", "other.key"]
    (tmp_path / "a.key").write_bytes(b"kept")  # an existing file is never replaced
    assert derive_key_file(parent, tmp_path / "a.key", "rank1").read_bytes() == b"kept"
    with pytest.raises(FileNotFoundError):
        derive_key_file(tmp_path / "missing.key", tmp_path / "b.key", "rank1")


def test_hivemind_reads_a_derived_key_as_the_same_peer_id(tmp_path):
    # in a subprocess: hivemind cannot share a process with py-libp2p (other tests import it)
    path = tmp_path / "k.key"
    path.write_bytes(key_file_bytes(rsa_key_from_seed(b"peer")))
    code = ("import sys; from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID; "
            "print(PeerID.from_identity(open(sys.argv[1], 'rb').read()).to_base58())")
    ids = [subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip() for _ in range(2)]
    assert ids[0] == ids[1] and ids[0].startswith("Qm") and len(ids[0]) == 46
