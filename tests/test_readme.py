"""The README's Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_diloco_sends_fewer_bytes():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "LocalSwarm" in b)
    r = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sent = {m[0]: (float(m[1]), int(m[2].replace(",", ""))) for m in
            re.findall(r"(\w+)\s+loss ([\d.]+)\s+bytes sent per worker ([\d,]+)", r.stdout)}
    assert set(sent) == {"ddp", "diloco"}
    assert sent["ddp"][1] >= 40 * sent["diloco"][1]
    assert sent["diloco"][0] < 1.1 * sent["ddp"][0]
