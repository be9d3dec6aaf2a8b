"""Gene trends (fatebook.trends): CellRank's choice of cells and time range by hand, the fit's invariances and
errors, the plots. Parity of the curves with CellRank 2.3.3's pygam GAM is in tests/test_analyses.py."""
from __future__ import annotations
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import convolve


def _with_fates(adata, seed=0):
    "Attach made-up fate probabilities of two lineages: one rising with latent time, one peaking at 0.6."
    t = adata.obs["latent_time"].to_numpy(float)
    p = np.clip(0.05 + 0.9 * t, 0, 1); q = 0.05 + 0.9 * np.exp(-((t - 0.6) / 0.15) ** 2)
    adata.obsm["fb_fate_probs_fwd"] = np.c_[p, q]
    adata.uns["fb_fate_probs_fwd_names"] = np.array(["late", "mid"], dtype=object)
    adata.uns["fb_fate_probs_fwd_colors"] = np.array(["#1f77b4", "#ff7f0e"], dtype=object)
    return adata


def test_lineage_cells_rule_by_hand():
    from fatebook.trends import lineage_cells
    t = np.array([0.0, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])   # one duplicate time (0.1)
    w = np.array([0.0, 0.2, 0.9, 0.3, 0.5, 0.6, 0.9, 0.95, 0.99, 0.7, 0.6, 0.5])
    rows, ws, x = lineage_cells(t, w, n_test_points=40)
    # by hand: unique times keep the first cell (index 1, not 2); weights < 0.01 -> 0.01; among weights >= median,
    # the running mean (window 40 // 20 = 2: scipy averages each weight with the next) peaks at t = 0.6,
    # (0.95 + 0.99) / 2, where the range ends
    xs, first = np.unique(t, return_index=True); wf = np.maximum(w[first], 0.01)
    sel = wf >= np.median(wf)
    end = xs[sel][np.argmax(convolve(wf[sel], np.ones(2) / 2, mode="nearest"))]
    assert 1 in rows and 2 not in rows
    assert x[0] == 0.0 and x[-1] == end == 0.6 and len(x) == 40
    assert rows.tolist() == [i for i in first if t[i] <= end]
    np.testing.assert_allclose(ws, wf[xs <= end])
    rows2, _, x2 = lineage_cells(t, w, n_test_points=40, time_range=(0.2, None))
    assert x2[0] == 0.2 and x2[-1] == 0.6
    _, _, x3 = lineage_cells(t, w, time_range=0.5)
    assert x3[-1] == 0.5
    _, _, x4 = lineage_cells(t, np.full(len(t), 0.3))        # no lineage signal: the whole range
    assert (x4[0], x4[-1]) == (0.0, 1.0)


def test_blocks_and_subsets_do_not_change_fits(dg100):
    from fatebook.trends import compute_gene_trends
    a = _with_fates(dg100)
    genes = list(a.var_names[:40])
    t1 = compute_gene_trends(a, genes, time_key="latent_time", layer="Ms")
    t2 = compute_gene_trends(a, genes, time_key="latent_time", layer="Ms", block_size=7)
    t3 = compute_gene_trends(a, genes[10:13], "late", time_key="latent_time", layer="Ms")
    for lin in ["late", "mid"]:
        np.testing.assert_allclose(t1.fits[lin].mean, t2.fits[lin].mean, rtol=1e-12)
        np.testing.assert_allclose(t1.fits[lin].upper, t2.fits[lin].upper, rtol=1e-12)
    np.testing.assert_allclose(t3.fits["late"].mean, t1.fits["late"].mean[10:13], rtol=1e-12)
    pk = t1.peak_time("late")
    assert pk.index.tolist() == genes and ((pk >= t1.x("late")[0]) & (pk <= t1.x("late")[-1])).all()
    assert "2 lineages" in repr(t1)


def test_normal_model_and_errors(dg100):
    from fatebook.trends import compute_gene_trends, fit_gam
    from fatebook.core import MissingKeyError
    a = _with_fates(dg100)
    a.layers["centred"] = a.layers["Ms"] - a.layers["Ms"].mean(0)
    with pytest.raises(ValueError, match="non-negative"):
        compute_gene_trends(a, list(a.var_names[:3]), time_key="latent_time", layer="centred")
    tn = compute_gene_trends(a, list(a.var_names[:3]), time_key="latent_time", layer="centred", distribution="normal")
    assert np.isfinite(tn.fits["late"].mean).all()
    with pytest.raises(MissingKeyError, match="Layer 'nope'"):
        compute_gene_trends(a, list(a.var_names[:3]), time_key="latent_time", layer="nope")
    with pytest.raises(ValueError, match="time ranges for 2 lineages"):
        compute_gene_trends(a, list(a.var_names[:3]), time_key="latent_time", time_range=[None])
    with pytest.raises(ValueError, match="duplicates"):
        compute_gene_trends(a, ["Tmsb10", "Tmsb10"], time_key="latent_time")
    with pytest.raises(ValueError, match="conf_int"):
        fit_gam(np.linspace(0, 1, 50), np.ones(50), conf_int=1.5)
    b = a.copy(); del b.obsm["fb_fate_probs_fwd"]
    with pytest.raises(MissingKeyError, match="compute the fate probabilities"):
        compute_gene_trends(b, ["Tmsb10"], time_key="latent_time")


def test_plots(dg100):
    import matplotlib.pyplot as plt
    from fatebook.trends import compute_gene_trends, plot_gene_trends, plot_heatmap, cluster_trends, plot_cluster_trends
    a = _with_fates(dg100)
    genes = list(a.var_names[:30])
    tr = compute_gene_trends(a, genes, time_key="latent_time", layer="Ms")
    fig = plot_gene_trends(a, genes[:3], time_key="latent_time", layer="Ms", trends=tr)
    assert len([x for x in fig.axes if x.get_label() != "<colorbar>"]) == 6; plt.close(fig)
    fig = plot_gene_trends(a, genes[:3], time_key="latent_time", layer="Ms", trends=tr, same_plot=True, conf_int=False, hide_cells=True)
    assert [l.get_label() for l in fig.axes[0].get_lines()] == ["late", "mid"]; plt.close(fig)
    fig = plot_heatmap(a, genes, time_key="latent_time", trends=tr, keep_gene_order=True)
    assert fig.fatebook_order["late"] == genes; plt.close(fig)
    fig = plot_heatmap(a, genes[:5], time_key="latent_time", trends=tr, mode="genes")
    assert [x.get_title() for x in fig.axes[:5]] == genes[:5]; plt.close(fig)
    with pytest.raises(ValueError, match="mode"):
        plot_heatmap(a, genes, time_key="latent_time", trends=tr, mode="cells")
    with pytest.raises(KeyError, match="not in the given `trends`"):
        plot_gene_trends(a, ["Xist_not_a_gene"], time_key="latent_time", trends=tr)
    cl = cluster_trends(tr, "late", n_clusters=3)
    assert cl["cluster"].nunique() == 3 and set(cl.index) <= set(genes)
    fig = plot_cluster_trends(cl); plt.close(fig)
