"""The README's main job, end to end through the command line (small simulated data)."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd


def test_fatebook_run_recovers_true_fates(tmp_path):
    out = tmp_path / "res"
    exe = Path(sys.executable).with_name("fatebook")
    r = subprocess.run([str(exe), "run", "--out", str(out), "--n-cells", "600", "--n-genes", "120", "--quiet"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "MPLBACKEND": "agg"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "true fate A" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["truth"]["all_true_terminal_found"], s["truth"]
    for f in ("A", "B"):
        assert s["truth"][f"auc_{f}"]["auc"] > 0.95, s["truth"]
    fp = pd.read_csv(out / "fate_probabilities.csv", index_col=0)
    np.testing.assert_allclose(fp.sum(1), 1, atol=1e-6)
    assert (out / "drivers.csv").exists() and (out / "fatebook_result.h5ad").exists()
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"spectrum.png", "coarse_T.png", "fate_probabilities.png", "projection.png"} <= figs, figs
