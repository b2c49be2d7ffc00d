"""notebooks/quickstart.ipynb runs top to bottom (tiny variant) and saves its plot."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_quickstart_notebook_runs(tmp_path):
    pytest.importorskip("matplotlib")
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    script = tmp_path / "nb.py"
    script.write_text("import matplotlib\nmatplotlib.use('Agg')\n" + code +
                      "\nprint('CURVE', json.dumps(curve))\n")
    env = dict(os.environ, QUICKSTART_VARIANT="tiny", JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
                   "--xla_force_host_platform_device_count=8", ""))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT / "notebooks", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads(proc.stdout.split("CURVE ", 1)[1])
    assert [r["N"] for r in curve] == [1, 2, 4, 8]
    png = proc.stdout.split("saved ", 1)[1].split()[0]
    assert os.path.getsize(png) > 10_000  # a real figure, not an empty file
