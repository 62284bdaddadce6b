"""The command line: version and environment report."""

import subprocess
import sys

import lowcomm


def run(*args):
    return subprocess.run([sys.executable, "-m", "lowcomm", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lowcomm {lowcomm.__version__}"


def test_env_lists_versions():
    import torch

    r = run("env")
    assert r.returncode == 0
    assert torch.__version__ in r.stdout and "hivemind" in r.stdout and "libp2p" in r.stdout
