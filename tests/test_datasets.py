"""Integration tests of fatebook.datasets: the simulator's truth is recoverable by scVelo's standard pipeline,
and the pinned scientific stack (numpy<2.4, pandas<3) runs scVelo's stochastic and dynamical models."""
import numpy as np
import pytest
import scanpy as sc
from scipy.stats import spearmanr

from fatebook.datasets import simulate, preprocess, pancreas


@pytest.fixture(scope="module")
def sim_pp():
    return preprocess(simulate(n_cells=1000, n_genes=200, seed=0))


def test_pseudotimes_recover_true_time(sim_pp):
    """Velocity pseudotime (rooted at the earliest cell) and DPT both order cells by true time (Spearman > 0.9)."""
    import scvelo as scv
    a = sim_pp.copy()
    root = int(np.argmin(a.obs["true_time"].to_numpy()))
    scv.tl.velocity_pseudotime(a, root_key=root)
    rho_v = spearmanr(a.obs["velocity_pseudotime"], a.obs["true_time"])[0]
    assert rho_v > 0.9, rho_v
    a.uns["iroot"] = root
    sc.tl.diffmap(a)
    sc.tl.dpt(a, n_dcs=3)  # the arms are long and clean: higher diffusion components oscillate along them
    rho_d = spearmanr(a.obs["dpt_pseudotime"], a.obs["true_time"])[0]
    assert rho_d > 0.9, rho_d


def test_estimated_velocity_points_like_the_truth(sim_pp):
    a = sim_pp
    v = a.layers["velocity"]
    # genes with dynamics (housekeeping genes sit at steady state: their true velocity is 0)
    ok = ~np.isnan(v).any(0) & (a.var["program"] != "housekeeping").to_numpy()
    tv = a.layers["true_velocity"][:, ok]
    v = v[:, ok]
    # per gene, the estimated velocity correlates with the true one across cells
    r = [np.corrcoef(v[:, j], tv[:, j])[0, 1] for j in range(v.shape[1]) if v[:, j].std() > 0]
    assert np.nanmedian(r) > 0.5, np.nanmedian(r)


def test_simulate_truth_fields():
    a = simulate(n_cells=400, n_genes=80, n_fates=3, seed=3)
    assert set(a.obs["true_terminal"].dropna().unique()) == {"A", "B", "C"}
    assert a.uns["terminal_states"] == ["A", "B", "C"]
    # the true velocity of a gene that is being induced is positive
    assert np.isfinite(a.layers["true_velocity"]).all()
    assert a.layers["spliced"].dtype == np.float32


def test_preprocess_does_not_modify_input():
    a = simulate(n_cells=200, n_genes=50, seed=1)
    before = a.copy()
    preprocess(a, umap=False, velocity_graph=False)
    assert a.shape == before.shape and set(a.layers) == set(before.layers)
    assert (a.X != before.X).nnz == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stochastic", "dynamical"])
def test_velocity_stack_runs_on_pinned_versions(mode):
    """scvelo 0.3.4 breaks on numpy>=2.4 (stochastic) and pandas 3 (recover_dynamics): the pins make both work."""
    import pandas as pd
    assert tuple(map(int, np.__version__.split(".")[:2])) < (2, 4)
    assert int(pd.__version__.split(".")[0]) < 3
    a = preprocess(simulate(n_cells=200, n_genes=40, seed=2), mode=mode, umap=False, n_top_genes=None)
    v = a.layers["velocity"]
    assert v.shape == a.shape and np.isfinite(v[:, ~np.isnan(v).any(0)]).all()
    assert (~np.isnan(v).any(0)).sum() >= 5


def test_pancreas_local_copy(data_dir):
    a = pancreas(path=data_dir / "pancreas_2531x2000.h5ad")
    assert a.shape == (2531, 2000)
    assert a.obs["clusters"].nunique() == 7


def test_is_preprocessed(dentate_gyrus_path, data_dir):
    "Data that already have moments, velocity and a kNN graph are recognised (the CLI then leaves them alone)."
    from fatebook.datasets import is_preprocessed, missing_preprocessing, read_h5ad
    assert is_preprocessed(read_h5ad(dentate_gyrus_path(200)))
    raw = pancreas(path=data_dir / "pancreas_2531x2000.h5ad")
    assert not is_preprocessed(raw)
    assert missing_preprocessing(raw) == ["layers['Ms']", "obsp['connectivities']", "layers['velocity']"]


@pytest.mark.slow
def test_scvelo_leaves_warning_filters_alone():
    """scVelo switches DeprecationWarnings on globally (on import and in every call with renamed arguments); after
    fatebook's preprocess (dynamical model included) a library's DeprecationWarning stays hidden, as Python's defaults
    want, and the run itself prints none."""
    import subprocess, sys, textwrap
    code = textwrap.dedent("""
        import warnings
        from fatebook.core import settings; settings.progress_bar = False
        from fatebook.datasets import preprocess, simulate
        preprocess(simulate(n_cells=150, n_genes=30, seed=1), mode="dynamical", umap=False, velocity_graph=False)
        exec(compile("import warnings\\nwarnings.warn('LIBRARY-DEPRECATION', DeprecationWarning)", "somelib", "exec"),
             {"__name__": "somelib"})
        print("FILTERS", [f for f in warnings.filters if f[0] in ("default", "always") and f[2] is DeprecationWarning and f[3] is None])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FILTERS []" in r.stdout, r.stdout
    assert "LIBRARY-DEPRECATION" not in r.stderr and "DeprecationWarning" not in r.stderr, r.stderr[-2000:]
    assert "scVelo's slow step" in r.stderr and "recover_dynamics: fitted" in r.stderr, r.stderr[-2000:]
