"""Synthetic single-cell data for the scale benchmark (issue 14): a root and three branches in a 10-dimensional latent
space, 50 genes (a random linear map of the latent position, plus noise), RNA velocity = branch direction + noise
mapped the same way, and scanpy's 30-nearest-neighbour graph (pynndescent above 4,096 cells, UMAP connectivities),
exactly as `scanpy.pp.neighbors` builds it. Vectorised and seeded; both tools read the same file.

usage (fatebook env): make_scale.py N OUT.h5ad [--k 30] [--genes 50] [--seed 0]
The AnnData: X = Ms (float32, n x genes), layers 'Ms' and 'velocity' (float32), var['velocity_genes'] (all True),
obs['clusters'] ('root_0'..'root_4', 'A_0'..'A_4', ...; the tips are 'A_4', 'B_4', 'C_4'), obsm['X_pca'] (the
latent position, 10 dims), obsp['connectivities'] and ['distances'], uns['neighbors'].
"""
import argparse, time
import numpy as np
import pandas as pd


def tree(n, genes=50, seed=0, dim=10, noise=0.12, vnoise=0.3):
    "Latent positions, per-cell velocity (latent) and cluster labels of a root + three branches."
    rng = np.random.default_rng(seed)
    dirs = np.zeros((4, dim)); dirs[0, 0] = 1
    dirs[1, [0, 1]] = [0.5, 0.9]; dirs[2, [0, 2]] = [0.5, 0.9]; dirs[3, [0, 1, 2]] = [0.5, -0.6, -0.6]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = np.array([1.0, 1.5, 1.5, 1.5])
    seg = rng.choice(4, size=n, p=lengths / lengths.sum())
    pos = rng.random(n) * lengths[seg]
    start = np.where(seg[:, None] == 0, 0.0, dirs[0] * lengths[0])
    x = start + pos[:, None] * dirs[seg] + noise * rng.standard_normal((n, dim))
    v = dirs[seg] + vnoise * rng.standard_normal((n, dim))
    W = rng.standard_normal((dim, genes)) / np.sqrt(dim)
    Ms = (x @ W + 0.02 * rng.standard_normal((n, genes))).astype(np.float32)
    V = (v @ W).astype(np.float32)
    bins = np.minimum((pos / lengths[seg] * 5).astype(int), 4)
    clusters = np.array(["root", "A", "B", "C"])[seg].astype(object) + "_" + bins.astype(str)
    return x.astype(np.float32), Ms, V, clusters


def make(n, k=30, genes=50, seed=0):
    import anndata as ad, scanpy as sc
    x, Ms, V, clusters = tree(n, genes, seed)
    obs = pd.DataFrame({"clusters": pd.Categorical(clusters)}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame({"velocity_genes": np.ones(genes, bool)}, index=[f"g{j}" for j in range(genes)])
    a = ad.AnnData(X=Ms, obs=obs, var=var, layers={"Ms": Ms, "velocity": V}, obsm={"X_pca": x})
    sc.pp.neighbors(a, n_neighbors=k, use_rep="X_pca", random_state=seed, transformer=_PyNNDescent(k, seed))
    return a


class _PyNNDescent:
    """scanpy's default kNN search for large data (pynndescent), returning a `scipy.sparse.csr_matrix`: with scipy 1.17,
    scanpy 1.11's own pynndescent path fails on the `csr_array` the transformer returns (no `getnnz`)."""
    def __init__(self, k, seed):
        from pynndescent import PyNNDescentTransformer
        self._t = PyNNDescentTransformer(n_neighbors=k, metric="euclidean", random_state=seed, n_jobs=-1)
    def fit_transform(self, X):
        import scipy.sparse as sp
        return sp.csr_matrix(self._t.fit_transform(X))
    def get_params(self, deep=True): return self._t.get_params(deep)
    def set_params(self, **kw): self._t.set_params(**kw); return self
    def fit(self, X, y=None): self._t.fit(X); return self
    def transform(self, X): import scipy.sparse as sp; return sp.csr_matrix(self._t.transform(X))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int); ap.add_argument("out")
    ap.add_argument("--k", type=int, default=30); ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    A = make(a.n, a.k, a.genes, a.seed)
    A.write_h5ad(a.out)
    C = A.obsp["connectivities"]
    print(f"scale data n={a.n:,} genes={a.genes} k={a.k}: connectivities nnz={C.nnz:,} "
          f"({C.nnz / a.n:.1f} per cell), built in {time.perf_counter() - t:.1f} s -> {a.out}")


if __name__ == "__main__":
    main()
