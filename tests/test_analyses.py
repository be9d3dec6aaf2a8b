"""Issue 15 analyses against CellRank 2.3.3 on the preprocessed pancreas (2,531 cells; 2,000 of the original 27,998
genes, about 1,000 after filtering, see ../shared/data/README.md), plus hand-made cases.

One CellRank run (tests/cellrank_ref/analyses.py) on one file written here — fatebook's 0.8 velocity + 0.2
connectivity transition matrix and its fate probabilities (Alpha/Beta/Delta/Epsilon) in CellRank's keys — gives:
- CytoTRACE: score, pseudotime and hard-threshold transition matrix equal to 1e-6 (layer Ms, mean of 200 genes);
- gene trends (CellRank's default pygam GAM) for 8 genes x 2 lineages: curves and 95% bands equal to 1e-6 relative;
- cross-boundary correctness on four cluster pairs equal to 1e-7;
- TSI table and score for up to 6 macrostates — on the 200-cell dentate gyrus (mature granule cells, astrocytes,
  oligodendrocytes): CellRank's Nelder-Mead GPCCA runs on the pancreas take minutes;
- circular projection coordinates (default and optimal lineage order) equal to 1e-12.
"""
from __future__ import annotations
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

TERMINAL = ["Alpha", "Beta", "Delta", "Epsilon"]
GENES = ["Gcg", "Ins2", "Ghrl", "Sst", "Pdx1", "Arx", "Nkx6-1", "Isl1"]
TREND_LINEAGES = ["Alpha", "Beta"]
PAIRS = [("Ngn3 low EP", "Ngn3 high EP"), ("Ngn3 high EP", "Pre-endocrine"), ("Pre-endocrine", "Beta"), ("Pre-endocrine", "Alpha")]
TSI_N = 6
TSI_TERMINAL = ["Granule mature", "Astrocytes", "OL"]


@pytest.fixture(scope="module")
def pipeline(_pancreas_pp_session, tmp_path_factory):
    "fatebook's pipeline on the preprocessed pancreas, and the same inputs written for CellRank."
    from fatebook.core import settings
    from fatebook.kernels import ConnectivityKernel, VelocityKernel
    from fatebook.gpcca import GPCCA
    settings.progress_bar = False
    a = _pancreas_pp_session.copy()
    k = 0.8 * VelocityKernel(a).compute_transition_matrix() + 0.2 * ConnectivityKernel(a).compute_transition_matrix()
    g = GPCCA(k)
    g.compute_schur(n_components=20)
    g.compute_macrostates(n_states=12, cluster_key="clusters")
    g.set_terminal_states_from_macrostates(TERMINAL)
    g.compute_fate_probabilities(tol=1e-12)
    out = a.copy()
    out.obsp["fb_T"] = sp.csr_matrix(g.transition_matrix)
    B = g.fate_probabilities
    out.obsm["lineages_fwd"] = np.asarray(B)
    ts = g.terminal_states.astype(str).where(g.terminal_states.notna(), None)
    out.obs["term_states_fwd"] = pd.Categorical(ts, categories=list(B.names))
    out.uns["term_states_fwd_colors"] = np.array(B.colors, dtype=object)
    for key in list(out.obsm):
        if key.startswith("fb_"): del out.obsm[key]
    for key in list(out.uns):
        if key.startswith("fb_"): del out.uns[key]
    for key in list(out.obs):
        if key.startswith("fb_"): del out.obs[key]
    path = tmp_path_factory.mktemp("analyses") / "pancreas_fates.h5ad"
    out.write_h5ad(path)
    return dict(adata=a, g=g, path=path)


@pytest.fixture(scope="module")
def dg_pipeline(dentate_gyrus_path, tmp_path_factory):
    "fatebook's GPCCA on the 200-cell dentate gyrus, and its transition matrix written for CellRank (TSI)."
    import anndata as ad
    from fatebook.kernels import ConnectivityKernel, VelocityKernel
    from fatebook.gpcca import GPCCA
    a = ad.read_h5ad(dentate_gyrus_path(200))
    g = GPCCA(0.8 * VelocityKernel(a).compute_transition_matrix() + 0.2 * ConnectivityKernel(a).compute_transition_matrix())
    g.compute_schur(n_components=12)
    out = ad.AnnData(X=np.zeros((a.n_obs, 1), np.float32), obs=a.obs[["clusters"]].copy())
    out.obsp["fb_T"] = sp.csr_matrix(g.transition_matrix)
    path = tmp_path_factory.mktemp("analyses_dg") / "dg200_T.h5ad"
    out.write_h5ad(path)
    return dict(g=g, path=path)


@pytest.fixture(scope="module")
def ref(pipeline, dg_pipeline, run_cellrank):
    r = run_cellrank("analyses", h5ad=pipeline["path"], time_key="dpt_pseudotime", genes=GENES, lineages=TREND_LINEAGES,
                     layer="Ms", T_key="fb_T", pairs=[list(p) for p in PAIRS], tsi_h5ad=dg_pipeline["path"], tsi_n=TSI_N,
                     tsi_terminal=TSI_TERMINAL, tsi_n_cells=10, n_components=12)
    assert r["cellrank_version"] == "2.3.3"
    return r


# ---- CytoTRACE ---------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_cytotrace_parity(pipeline, ref):
    from fatebook.cytotrace import CytoTRACEKernel
    a = pipeline["adata"].copy()
    k = CytoTRACEKernel(a).compute_cytotrace(layer="Ms", aggregation="mean", n_genes=200).compute_transition_matrix()
    np.testing.assert_allclose(a.obs["ct_score"].to_numpy(float), ref["ct_score"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.obs["ct_pseudotime"].to_numpy(float), ref["ct_pseudotime"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a.obs["ct_num_exp_genes"].to_numpy(float), ref["ct_num_exp_genes"])
    # CellRank correlates in the data's float32 (differences up to ~1e-4); the chosen genes are the same
    np.testing.assert_allclose(a.var["ct_gene_corr"].to_numpy(float), ref["ct_gene_corr"], atol=1e-3, equal_nan=True)
    assert sorted(a.var_names[a.var["ct_correlates"].to_numpy(bool)]) == sorted(ref["ct_correlates"])
    T, R = k.transition_matrix, sp.csr_matrix(ref["ct_T"])
    assert T.shape == R.shape and (T != 0).sum() == (R != 0).sum()
    assert abs(T - R).max() < 1e-6


# ---- gene trends -------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_gene_trends_parity(pipeline, ref):
    from fatebook.trends import compute_gene_trends
    # ties='first' is CellRank's rule (one cell per distinct time); the default keeps tied cells (one pair here)
    tr = compute_gene_trends(pipeline["g"], GENES, TREND_LINEAGES, time_key="dpt_pseudotime", layer="Ms", ties="first")
    for lin in TREND_LINEAGES:
        f = tr.fits[lin]
        np.testing.assert_allclose(f.x, ref[f"trend_{lin}__x"][0], rtol=1e-12)        # the lineage's time range
        conv = ref[f"trend_{lin}__converged"].astype(bool)
        assert f.converged.all() and conv.sum() >= len(GENES) - 2   # fatebook refits pygam's unconverged genes
        scale = np.abs(ref[f"trend_{lin}__y"]).max(axis=1, keepdims=True)
        for ours, theirs in [(f.mean, ref[f"trend_{lin}__y"]), (f.lower, ref[f"trend_{lin}__lo"]), (f.upper, ref[f"trend_{lin}__hi"])]:
            assert (np.abs(ours - theirs) / scale)[conv].max() < 1e-6, lin
    # pygam's own algorithm, unconverged genes included (their last iterate), with step_control='diverged'
    tp = compute_gene_trends(pipeline["g"], GENES, TREND_LINEAGES, time_key="dpt_pseudotime", layer="Ms", step_control="diverged",
                             ties="first")
    for lin in TREND_LINEAGES:
        np.testing.assert_array_equal(tp.fits[lin].converged, ref[f"trend_{lin}__converged"])
        scale = np.abs(ref[f"trend_{lin}__y"]).max(axis=1, keepdims=True)
        assert (np.abs(tp.fits[lin].mean - ref[f"trend_{lin}__y"]) / scale).max() < 1e-6, lin


# ---- cross-boundary correctness -----------------------------------------------------------------------------------
@pytest.mark.parity
def test_cbc_parity(pipeline, ref):
    from fatebook.diagnostics import cbc
    from fatebook.kernels import PrecomputedKernel
    a = pipeline["adata"].copy(); a.obsp["fb_T2"] = sp.csr_matrix(pipeline["g"].transition_matrix)
    k = PrecomputedKernel(a, obsp_key="fb_T2")
    for i, (s, t) in enumerate(PAIRS):
        ours = cbc(k, s, t, "clusters", rep="X_pca", graph_key="distances")
        assert len(ours) == len(ref[f"cbc_{i}"]) > 0, (s, t)
        np.testing.assert_allclose(ours, ref[f"cbc_{i}"], atol=1e-7)
    # the velocity-based chain points along the known order
    assert np.mean(cbc(k, "Ngn3 high EP", "Pre-endocrine", "clusters")) > 0


# ---- TSI ---------------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_tsi_parity(dg_pipeline, ref):
    from fatebook.diagnostics import tsi
    g = dg_pipeline["g"]
    score = tsi(g, TSI_N, TSI_TERMINAL, "clusters", n_cells=10, optimizer="nelder-mead")   # CellRank's optimiser
    tab = g._fb_tsi["table"].sort_values("number_of_macrostates", ascending=False)
    m = tab["number_of_macrostates"].to_numpy()
    np.testing.assert_array_equal(m, ref["tsi_number_of_macrostates"])
    np.testing.assert_array_equal(tab["optimal_identification"].to_numpy(float), ref["tsi_optimal_identification"])
    # CellRank silently computes m + 1 macrostates when m would split a complex-conjugate pair; fatebook counts such
    # an m as failed and carries m - 1's value (CellRank's own rule for failed m). Every other m must agree.
    forbidden = set(g.eigendecomposition["forbidden"])
    ok = ~np.isin(m, list(forbidden))
    assert ok.sum() >= TSI_N - 3
    np.testing.assert_array_equal(tab["identified_terminal_states"].to_numpy(float)[ok], ref["tsi_identified_terminal_states"][ok])
    ident = dict(zip(m, tab["identified_terminal_states"]))
    for f in forbidden & set(m[m > 1]): assert ident[f] == ident[f - 1]
    t = tab[tab.number_of_macrostates <= TSI_N]
    assert abs(score - t["identified_terminal_states"].sum() / t["optimal_identification"].sum()) < 1e-12


# ---- circular projection -----------------------------------------------------------------------------------------
@pytest.mark.parity
def test_circular_projection_parity(pipeline, ref):
    import matplotlib.pyplot as plt
    from fatebook.lineage_plots import circular_projection
    g = pipeline["g"]
    for order in ("default", "optimal"):
        fig = circular_projection(g, keys="clusters", lineage_order=order, key_added=f"circ_{order}")
        plt.close(fig)
        ours, theirs = g.adata.obsm[f"circ_{order}"], ref[f"circ_{order}"]
        if order == "optimal" and not np.allclose(ours, theirs, atol=1e-12):
            theirs = theirs * [1, -1]   # the same tour run the other way (equally short): the mirror image
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


# ---- fate uncertainty on real data ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_fate_uncertainty_pancreas(pipeline):
    "Intervals on the pancreas: terminal cells exact, clusters' intervals contain their estimate, widths shrink with commitment."
    from fatebook.uncertainty import fate_uncertainty
    g = pipeline["g"]
    u = fate_uncertainty(g, n_boot=10, cluster_key="clusters", seed=0)
    term = g.terminal_states.notna().to_numpy()
    assert np.abs(u.width.to_numpy()[term]).max() < 1e-8
    c = u.clusters
    assert ((c["lower"] <= c["mean"] + 0.02) & (c["mean"] <= c["upper"] + 0.02)).mean() > 0.9
    # committed cells (one fate > 0.9) have narrower intervals than undecided ones
    est = u.estimate.to_numpy(); w = u.width.to_numpy().max(1)
    committed, undecided = est.max(1) > 0.9, est.max(1) < 0.5
    assert np.median(w[committed & ~term]) < np.median(w[undecided])


# ---- hand-made cases ---------------------------------------------------------------------------------------------
def test_cbc_sources_and_targets_as_lists():
    import anndata as ad
    from fatebook.diagnostics import cbc, boundary_cells
    n = 12; xs = np.arange(n, dtype=float)
    a = ad.AnnData(np.zeros((n, 1)))
    a.obsm["X_pca"] = np.c_[xs, xs ** 1.5, np.sin(xs)]
    a.obs["clusters"] = pd.Categorical(np.repeat(["A", "B", "C"], 4))
    D = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], format="csr"); a.obsp["distances"] = D
    class K: adata = a; transition_matrix = sp.csr_matrix(np.eye(n, k=1) + np.diag(np.r_[np.zeros(n - 1), 1.0]))
    assert boundary_cells(a, ["A", "B"], "C", "clusters").tolist() == [7]
    np.testing.assert_allclose(cbc(K, ["A", "B"], ["C"], "clusters"), [1.0])
    assert len(cbc(K, "A", "C", "clusters")) == 0          # no contact: empty, with a warning


def test_circular_projection_writes_and_orders(dg200):
    import matplotlib.pyplot as plt
    from fatebook.lineage_plots import circular_projection, circular_coordinates, optimal_lineage_order
    rng = np.random.default_rng(0)
    P = rng.dirichlet([0.3] * 5, dg200.n_obs)
    dg200.obsm["fb_fate_probs_fwd"] = P; dg200.uns["fb_fate_probs_fwd_names"] = np.array(list("abcde"), dtype=object)
    fig = circular_projection(dg200, keys=["clusters", "entropy"])
    plt.close(fig)
    Pn = P / P.mean(0); Pn /= Pn.sum(1, keepdims=True)
    order = optimal_lineage_order(Pn)
    np.testing.assert_allclose(dg200.obsm["X_fate_simplex_fwd"], circular_coordinates(P, True, order))


def test_cbc_by_hand():
    """Five cells in 3-d, clusters A = {0, 1, 2} and B = {3, 4}; the score of a boundary cell is the Pearson
    correlation over the coordinates of its graph-weighted displacement to its B neighbours and its expected one-step
    displacement under T. Worked by hand:
    cell 1 (B neighbours 3 with weight 1, 4 with 0.5): empirical (1,1,1) + 0.5 (1,2,0) = (1.5, 2, 1); T sends it to
    cell 2: (0, 1, 0); centred (0, .5, -.5) and (-1/3, 2/3, -1/3): r = 0.5 / sqrt(0.5 * 2/3) = sqrt(3)/2.
    cell 2 (neighbours 3 with 0.5, 4 with 2): 0.5 (1,0,1) + 2 (1,1,0) = (2.5, 2, 0.5); T: 1/4 to 1, 1/2 to 3,
    1/4 to 4: (0.75, 0, 0.5); centred (5/6, 1/3, -7/6) and (1/3, -5/12, 1/12): r = (1/24) / sqrt(13/6 * 7/24)
    = 1 / (2 sqrt(91)). Cell 0 touches no B cell. The same with integer labels and names holding a comma."""
    import anndata as ad
    from fatebook.diagnostics import cbc, boundary_cells, cbc_table
    X = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [2, 1, 1], [2, 2, 0]], float)
    E = {(0, 1): 1, (1, 2): 1, (1, 3): 1, (1, 4): 0.5, (2, 3): 0.5, (2, 4): 2, (3, 4): 1}
    G = np.zeros((5, 5))
    for (i, j), v in E.items(): G[i, j] = G[j, i] = v
    T = np.array([[0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, .25, 0, .5, .25], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]], float)
    want = [np.sqrt(3) / 2, 1 / (2 * np.sqrt(91))]
    for labels, src, tgt in [(["A"] * 3 + ["B"] * 2, "A", "B"), ([0, 0, 0, 1, 1], 0, 1), (["x, y"] * 3 + ["B b"] * 2, "x, y", ["B b"])]:
        a = ad.AnnData(np.zeros((5, 1))); a.obsm["X_pca"] = X; a.obsp["distances"] = sp.csr_matrix(G)
        a.obs["cl"] = pd.Categorical(labels)
        class K: adata = a; transition_matrix = sp.csr_matrix(T)
        assert boundary_cells(a, src, tgt, "cl").tolist() == [1, 2]
        np.testing.assert_allclose(cbc(K, src, tgt, "cl"), want, rtol=1e-12)
    tab = cbc_table(K, ("x, y", "B b"), "cl")                       # one pair given as a tuple
    assert len(tab) == 1 and tab["n_boundary"].item() == 2
    np.testing.assert_allclose(tab["mean"].item(), np.mean(want))
    with pytest.raises(ValueError, match="share cluster"):
        cbc(K, "x, y", ["x, y", "B b"], "cl")


def test_fate_uncertainty_lineage_names(dg200):
    "Terminal states named with a comma, a space and an integer-like label, and a merged lineage: intervals computed."
    from fatebook.kernels import ConnectivityKernel, VelocityKernel
    from fatebook.gpcca import GPCCA
    from fatebook.uncertainty import fate_uncertainty, plot_fate_uncertainty
    import matplotlib.pyplot as plt
    a = dg200
    a.obs["clusters"] = a.obs["clusters"].astype(str).replace({"Granule mature": "Granule, mature", "Astrocytes": "Astro cytes", "OL": "7"}).astype("category")
    g = GPCCA(0.8 * VelocityKernel(a).compute_transition_matrix() + 0.2 * ConnectivityKernel(a).compute_transition_matrix())
    g.set_terminal_states({"clusters": ["Granule, mature", "Astro cytes", "7"]})
    g.compute_fate_probabilities(keys=["Granule, mature", ("Astro cytes", 7)])
    before = a.copy()
    u = fate_uncertainty(g, n_boot=20, level=0.5, seed=1)
    assert u.lineages == ["Granule, mature", "Astro cytes, 7"]
    # writes nothing; the same seed gives the same intervals
    assert a.obs.equals(before.obs) and set(a.obsm) == set(before.obsm) and set(a.uns) == set(before.uns)
    assert all(np.array_equal(a.obsm[k], before.obsm[k]) for k in a.obsm)
    np.testing.assert_array_equal(fate_uncertainty(g, n_boot=20, level=0.5, seed=1).lower.to_numpy(), u.lower.to_numpy())
    term = g.terminal_states.notna().to_numpy()
    np.testing.assert_allclose(u.width.to_numpy()[term], 0, atol=1e-9)       # terminal cells are certain
    assert (u.width.to_numpy()[~term].max(0) > 0.01).all()
    fig = plot_fate_uncertainty(u, g, lineages=["Astro cytes, 7"]); plt.close(fig)


def test_lineage_plots_take_user_names(dg200):
    "Log-odds and the circular projection with names holding commas/spaces, an integer label and a merged lineage."
    import matplotlib.pyplot as plt
    from fatebook.lineage_plots import plot_log_odds, circular_projection, circular_coordinates
    P = np.random.default_rng(0).dirichlet([0.5] * 4, dg200.n_obs)
    dg200.obsm["fb_fate_probs_fwd"] = P
    dg200.uns["fb_fate_probs_fwd_names"] = np.array(["a, b", "7", "c d", "e"], dtype=object)
    fig = plot_log_odds(dg200, 7, ("a, b", "c d"), time_key="latent_time")
    y = fig.axes[0].collections[0].get_offsets()[:, 1]
    np.testing.assert_allclose(y, np.log(P[:, 1] + 1e-12) - np.log(P[:, 0] + P[:, 2] + 1e-12))
    assert fig.axes[0].get_ylabel() == "log(7 / a, b, c d)"; plt.close(fig)
    with pytest.raises(ValueError, match="more than one key"):
        plot_log_odds(dg200, "7", 7, time_key="latent_time")
    fig = circular_projection(dg200, lineages=["a, b", 7, ("c d", "e")], lineage_order="default"); plt.close(fig)
    Pm = np.c_[P[:, 0], P[:, 1], P[:, 2] + P[:, 3]]
    np.testing.assert_allclose(dg200.obsm["X_fate_simplex_fwd"], circular_coordinates(Pm, True, [0, 1, 2]))


def test_tsi_integer_cluster_labels(dg_pipeline):
    "Clusters labelled by integers (as leiden/louvain write them) give the same TSI table as their names."
    from fatebook.diagnostics import tsi_table
    g = dg_pipeline["g"]
    cl = g.adata.obs["clusters"].astype("category")
    g.adata.obs["clusters_int"] = pd.Categorical(cl.cat.codes.to_numpy())
    codes = [int(list(cl.cat.categories).index(t)) for t in TSI_TERMINAL]
    by_name = tsi_table(g, 4, TSI_TERMINAL, "clusters", n_cells=10)
    by_int = tsi_table(g, 4, codes, "clusters_int", n_cells=10)
    by_str = tsi_table(g, 4, [str(c) for c in codes], "clusters_int", n_cells=10)
    pd.testing.assert_frame_equal(by_int, by_name); pd.testing.assert_frame_equal(by_str, by_name)
    del g.adata.obs["clusters_int"]
