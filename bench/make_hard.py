"""A slowly mixing chain for the hard-spectrum benchmark (issue 14): `fatebook.linalg.slow_chain` (long branches,
nearly absorbing ends or weakly coupled blocks) at n cells, written as an AnnData both tools read.

usage (fatebook env): make_hard.py KIND N OUT.h5ad [--seed 0]      KIND: long | absorbing | blocks
The AnnData: X of shape n x 0, obsp['T_fwd'] (CSR float64), obs['clusters'] (branch/blob and a position bin) and
uns['tip_clusters'] (the clusters used as terminal states: the three branch ends, or the last three blobs).
"""
import argparse, time
import numpy as np
import pandas as pd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["long", "absorbing", "blocks"]); ap.add_argument("n", type=int); ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import anndata as ad
    from fatebook.linalg import slow_chain
    t0 = time.perf_counter()
    T, t, lab = slow_chain(a.n, a.kind, seed=a.seed)
    if a.kind == "blocks":
        clusters = np.array([f"blob_{i}" for i in lab], dtype=object); tips = [f"blob_{i}" for i in np.unique(lab)[-3:]]
    else:
        bins = np.minimum((t * 5).astype(int), 4)
        clusters = np.array(["A", "B", "C", "stem"])[lab].astype(object) + "_" + bins.astype(str); tips = ["A_4", "B_4", "C_4"]
    obs = pd.DataFrame({"clusters": pd.Categorical(clusters)}, index=[f"c{i}" for i in range(a.n)])
    A = ad.AnnData(X=np.zeros((a.n, 0)), obs=obs)
    A.obsp["T_fwd"] = T; A.uns["tip_clusters"] = tips
    A.write_h5ad(a.out)
    print(f"slow chain '{a.kind}' n={a.n:,}: nnz={T.nnz:,}, built in {time.perf_counter() - t0:.1f} s -> {a.out}")


if __name__ == "__main__":
    main()
