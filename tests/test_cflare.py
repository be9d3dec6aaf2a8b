"""CFLARE (fatebook.cflare): terminal states from eigenvectors on chains with known absorbing blocks, options,
determinism, shared downstream, errors, round-trip."""
from __future__ import annotations
import numpy as np
import pandas as pd
import anndata as ad
import pytest

from fatebook.core import Key
from fatebook.cflare import CFLARE
from fatebook.estimators import BaseEstimator
from fatebook.gpcca import block_chain
from fatebook.kernels import PrecomputedKernel


def _chain(seed=0):
    sizes = [60, 70, 80, 90]
    L = np.zeros((4, 4)); L[0, 1] = 0.08; L[1, 2] = L[1, 3] = 0.03; L[2, 0] = L[3, 0] = 0.0005
    T = block_chain(sizes, leak=L, seed=seed)
    blocks = np.repeat(["prog", "mid", "A", "B"], sizes)
    a = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical(blocks)}, index=[f"c{i}" for i in range(len(blocks))]))
    rng = np.random.default_rng(seed)
    a.obsm["X_umap"] = rng.standard_normal((len(blocks), 2)) + np.c_[pd.Categorical(blocks).codes * 5, np.zeros(len(blocks))]
    return a, T, blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_terminal_states_are_absorbing_blocks(seed):
    a, T, blocks = _chain(seed)
    cf = CFLARE(PrecomputedKernel(a, matrix=T)).compute_eigendecomposition(k=6)
    cf.compute_terminal_states(use=2, percentile=90, cluster_key="clusters")
    assert sorted(cf.terminal_states.cat.categories) == ["A", "B"]
    for n in ("A", "B"): assert set(blocks[(cf.terminal_states == n).to_numpy()]) == {n}
    p = cf.terminal_states_probabilities.to_numpy()
    assert p.max() == pytest.approx(1.0) and p.min() >= 0
    assert p[np.isin(blocks, ["A", "B"])].mean() > p[~np.isin(blocks, ["A", "B"])].mean()
    cf.compute_fate_probabilities()
    B = np.asarray(cf.fate_probabilities)
    np.testing.assert_allclose(B.sum(1), 1, atol=1e-10)
    for n in ("A", "B"): assert B[blocks == n, cf.fate_probabilities.names.index(n)].min() > 0.95


def test_defaults_options_and_determinism():
    a, T, blocks = _chain()
    cf = CFLARE(PrecomputedKernel(a, matrix=T)).compute_eigendecomposition(k=6)
    assert cf.eigendecomposition["eigengap"] + 1 >= 2
    cf.compute_terminal_states(use=[0, 1], percentile=90)                     # names without cluster_key: '0', '1'
    assert list(cf.terminal_states.cat.categories) == ["0", "1"]
    first = cf.terminal_states.astype(str).tolist()
    cf.compute_terminal_states(use=[0, 1], percentile=90)
    assert cf.terminal_states.astype(str).tolist() == first                  # seeded
    cf.compute_terminal_states(use=2, percentile=None, cluster_key="clusters")   # all cells, k = len(use) + 1
    assert cf.terminal_states.notna().all() and len(cf.terminal_states.cat.categories) == 3
    cf.compute_terminal_states(use=2, percentile=90, basis="umap", n_comps=2, cluster_key="clusters")
    assert cf.params["terminal_states"]["scale"] is True
    cf.compute_terminal_states(use=2, percentile=90, n_matches_min=2, n_neighbors_filtering=5, cluster_key="clusters")
    assert set(cf.terminal_states.dropna().astype(str)) <= {"A", "B"}
    assert CFLARE.compute_fate_probabilities is BaseEstimator.compute_fate_probabilities
    assert CFLARE.predict is CFLARE.compute_terminal_states


def test_errors_and_roundtrip(tmp_path):
    a, T, blocks = _chain()
    cf = CFLARE(PrecomputedKernel(a, matrix=T))
    with pytest.raises(RuntimeError, match="compute_eigendecomposition"): cf.compute_terminal_states()
    cf.compute_eigendecomposition(k=5, only_evals=True)
    with pytest.raises(RuntimeError, match="only_evals=False"): cf.compute_terminal_states()
    cf.compute_eigendecomposition(k=5)
    with pytest.raises(ValueError, match="among 0..4"): cf.compute_terminal_states(use=[5])
    with pytest.raises(ValueError, match="method='x' is not valid; choose one of 'kmeans', 'leiden'"): cf.compute_terminal_states(method="x")
    with pytest.raises(KeyError, match="valid categorical columns"): cf.compute_terminal_states(cluster_key="x")
    with pytest.raises(KeyError, match="X_pca"): cf.compute_terminal_states(basis="pca")
    with pytest.raises(ValueError, match="pass"): cf.compute_terminal_states(use=2, percentile=100, n_clusters_kmeans=50)
    with pytest.raises(ValueError, match="k=400"): cf.compute_eigendecomposition(k=400)
    assert cf.terminal_states is None and Key.obs.term_states() not in a.obs
    cf.compute_terminal_states(use=2, percentile=90, cluster_key="clusters").compute_fate_probabilities()
    p = tmp_path / "c.h5ad"; a.write_h5ad(p)
    c2 = CFLARE.from_adata(ad.read_h5ad(p))
    assert c2.params == cf.params
    np.testing.assert_array_equal(np.asarray(c2.fate_probabilities), np.asarray(cf.fate_probabilities))
    assert c2.fate_probabilities.colors == cf.fate_probabilities.colors
    np.testing.assert_allclose(c2.eigendecomposition["D"], cf.eigendecomposition["D"])
    np.testing.assert_allclose(c2.eigendecomposition["stationary_dist"], cf.eigendecomposition["stationary_dist"])


@pytest.mark.slow
def test_leiden():
    a, T, blocks = _chain()
    cf = CFLARE(PrecomputedKernel(a, matrix=T)).compute_eigendecomposition(k=6)
    cf.compute_terminal_states(use=2, percentile=90, method="leiden", n_neighbors=5, resolution=0.5, cluster_key="clusters")
    cats = set(cf.terminal_states.dropna().astype(str).str.split("_").str[0])
    assert cats == {"A", "B"}
