"""CellRank 2.3.3 reference for the analyses of issue 15 (runs in .venv-cellrank; see _refio.py for the protocol).

args:
  h5ad          preprocessed AnnData written by the test: layers Ms, obsp distances, obsm X_pca, obs clusters and the
                time key, obsp `T_key` (fatebook's transition matrix), obsm 'lineages_fwd' + obs 'term_states_fwd'
                (fatebook's fate probabilities in CellRank's keys)
  time_key      pseudotime in obs for the gene trends
  genes         genes whose trends are fitted (CellRank's default GAM: gamma/log, 6 knots, lam 3)
  lineages      lineages of the trends
  layer         expression layer of the trends
  T_key         obsp key of the transition matrix for cbc and TSI (a PrecomputedKernel)
  pairs         [[source, target], ...] for cbc (rep X_pca, graph distances)
  tsi_h5ad      AnnData for TSI (default `h5ad`; the same `T_key`), tsi_n the largest number of macrostates (0: skip),
                tsi_terminal, tsi_n_cells (top cells per macrostate), n_components for the Schur vectors (Brandts)
results: ct_score, ct_pseudotime, ct_num_exp_genes, ct_T (CSR), ct_correlates; trend_<lineage>__x/__y/__lo/__hi
(n_genes x 200 arrays, rows in `genes` order), trend_<lineage>__converged; cbc_<i> arrays; tsi table columns and
tsi_score; circ_default / circ_optimal coordinates.
"""
import sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from _refio import run


def main(h5ad, time_key, genes, lineages, layer="Ms", T_key="fb_T", pairs=(), tsi_h5ad=None, tsi_n=0, tsi_terminal=(),
         tsi_n_cells=30, n_components=20, cytotrace=True, circular=True):
    warnings.simplefilter("ignore")
    import anndata as ad, numpy as np, cellrank as cr
    import matplotlib; matplotlib.use("agg")
    import matplotlib.pyplot as plt
    a = ad.read_h5ad(h5ad)
    res, secs = {"cellrank_version": cr.__version__}, {}

    if cytotrace:
        t = time.perf_counter()
        b = a.copy()
        ctk = cr.kernels.CytoTRACEKernel(b).compute_cytotrace(layer=layer, aggregation="mean", n_genes=200)
        ctk.compute_transition_matrix(threshold_scheme="hard", frac_to_keep=0.3, n_jobs=1, show_progress_bar=False)
        secs["cytotrace"] = time.perf_counter() - t
        res["ct_score"] = np.asarray(b.obs["ct_score"])
        res["ct_pseudotime"] = np.asarray(b.obs["ct_pseudotime"])
        res["ct_num_exp_genes"] = np.asarray(b.obs["ct_num_exp_genes"], dtype=float)
        res["ct_gene_corr"] = np.asarray(b.var["ct_gene_corr"], dtype=float)
        res["ct_correlates"] = [str(g) for g in b.var_names[np.asarray(b.var["ct_correlates"], bool)]]
        res["ct_T"] = ctk.transition_matrix

    t = time.perf_counter()
    for lin in lineages:
        X, Y, LO, HI, CONV = [], [], [], [], []
        for g in genes:
            m = cr.models.GAM(a)
            m.prepare(g, lin, time_key=time_key, data_key=layer, n_test_points=200)
            m.fit(); m.predict(); m.confidence_interval()
            X.append(np.asarray(m.x_test).ravel()); Y.append(np.asarray(m.y_test).ravel())
            LO.append(np.asarray(m.conf_int)[:, 0]); HI.append(np.asarray(m.conf_int)[:, 1])
            CONV.append(bool(m._converged))
        res[f"trend_{lin}__x"] = np.array(X); res[f"trend_{lin}__y"] = np.array(Y)
        res[f"trend_{lin}__lo"] = np.array(LO); res[f"trend_{lin}__hi"] = np.array(HI)
        res[f"trend_{lin}__converged"] = np.array(CONV)
    secs["trends"] = time.perf_counter() - t

    if pairs:
        pk = cr.kernels.PrecomputedKernel(a, obsp_key=T_key)
    for i, (s, tg) in enumerate(pairs):
        res[f"cbc_{i}"] = np.asarray(pk.cbc(s, tg, cluster_key="clusters", rep="X_pca", graph_key="distances"), dtype=float)

    if tsi_n:
        t = time.perf_counter()
        b = a if tsi_h5ad is None else ad.read_h5ad(tsi_h5ad)
        gp = cr.estimators.GPCCA(cr.kernels.PrecomputedKernel(b, obsp_key=T_key))
        gp.compute_schur(n_components=n_components, method="brandts")
        res["tsi_score"] = float(gp.tsi(n_macrostates=tsi_n, terminal_states=list(tsi_terminal), cluster_key="clusters",
                                        n_cells=tsi_n_cells))
        df = gp._tsi.to_df()
        for c in df.columns: res[f"tsi_{c}"] = np.asarray(df[c], dtype=float)
        secs["tsi"] = time.perf_counter() - t

    if circular:
        for order in ("default", "optimal"):
            cr.pl.circular_projection(a, keys="clusters", lineage_order=order, key_added=f"circ_{order}")
            plt.close("all")
            res[f"circ_{order}"] = np.asarray(a.obsm[f"circ_{order}"])
    res["analyses_seconds"] = secs
    return res


if __name__ == "__main__":
    run(main)
