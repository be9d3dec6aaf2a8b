"""A synthetic n-cell kNN graph with a branching drift (a root segment and three branches in 10 dimensions), its
row-stochastic transition matrix (0.8 * velocity-like softmax + 0.2 * row-normalised kNN) and the cells of the
three branch tips. Vectorised (no per-cell loops), seeded. Both tools read the same file.

usage (fatebook env): make_synthetic.py N OUT.h5ad [--k 30] [--seed 0]
The AnnData has X of shape n x 0 (no genes), obs['clusters'] (segment + position bin: 'root_0'..'root_4',
'A_0'..'A_4', ...; the last bin of each branch, 'A_4', 'B_4', 'C_4', is the tip), obsp['T_fwd'] (CSR float64).
"""
import argparse, time
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make(n, k=30, seed=0, dim=10, noise=0.12, scale=2.0):
    rng = np.random.default_rng(seed)
    dirs = np.zeros((4, dim)); dirs[0, 0] = 1
    dirs[1, [0, 1]] = [0.5, 0.9]; dirs[2, [0, 2]] = [0.5, 0.9]; dirs[3, [0, 1, 2]] = [0.5, -0.6, -0.6]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = np.array([1.0, 1.5, 1.5, 1.5])
    seg = rng.choice(4, size=n, p=lengths / lengths.sum())
    pos = rng.random(n) * lengths[seg]
    start = np.where(seg[:, None] == 0, 0.0, dirs[0] * lengths[0])
    x = start + pos[:, None] * dirs[seg] + noise * rng.standard_normal((n, dim))
    v = dirs[seg] + 0.3 * rng.standard_normal((n, dim))  # noisy forward drift
    from sklearn.neighbors import NearestNeighbors
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    _, idx = nn.kneighbors(x)
    idx = idx[:, 1:]                                   # drop self
    rows = np.repeat(np.arange(n), k); cols = idx.ravel()
    d = x[cols] - x[rows]
    cos = (d * v[rows]).sum(1) / (np.linalg.norm(d, axis=1) * np.linalg.norm(v[rows], axis=1) + 1e-12)
    logit = (scale * cos).reshape(n, k)
    p = np.exp(logit - logit.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    Tv = sp.csr_matrix((p.ravel(), (rows, cols)), shape=(n, n))
    C = sp.csr_matrix((np.ones(n * k), (rows, cols)), shape=(n, n)); C = ((C + C.T) > 0).astype(float)
    Tc = sp.diags(1 / np.asarray(C.sum(1)).ravel()) @ C
    T = (0.8 * Tv + 0.2 * Tc).tocsr(); T.sort_indices()
    T = sp.diags(1 / np.asarray(T.sum(1)).ravel()) @ T
    bins = np.minimum((pos / lengths[seg] * 5).astype(int), 4)
    clusters = np.array(["root", "A", "B", "C"])[seg].astype(object) + "_" + bins.astype(str)
    return sp.csr_matrix(T), clusters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int); ap.add_argument("out")
    ap.add_argument("--k", type=int, default=30); ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import anndata as ad
    t = time.perf_counter()
    T, clusters = make(a.n, a.k, a.seed)
    obs = pd.DataFrame({"clusters": pd.Categorical(clusters)}, index=[f"c{i}" for i in range(a.n)])
    A = ad.AnnData(X=np.zeros((a.n, 0)), obs=obs)
    A.obsp["T_fwd"] = T
    A.write_h5ad(a.out)
    print(f"synthetic n={a.n} k={a.k}: nnz={T.nnz}, built in {time.perf_counter() - t:.1f} s -> {a.out}")


if __name__ == "__main__":
    main()
