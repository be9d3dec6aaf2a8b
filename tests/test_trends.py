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
    rows, ws, x = lineage_cells(t, w, n_test_points=40, ties="first")   # CellRank's rule
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
    rows_k, ws_k, xk = lineage_cells(t, w, n_test_points=40)                 # default: tied cells kept
    assert rows_k.tolist() == [i for i in range(len(t)) if t[i] <= end] and (xk == x).all()
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


# ---- names, parameters and inputs as users give them (issue 15 review) ------------------------------------------
import logging
from contextlib import contextmanager


@contextmanager
def fatebook_log():
    "Collect fatebook's log messages (its logger does not propagate)."
    from fatebook.core import logger
    msgs = []
    h = logging.Handler(); h.emit = lambda r: msgs.append(r.getMessage())
    logger.addHandler(h)
    try: yield msgs
    finally: logger.removeHandler(h)


def _named(adata, names=("late, rising", "7")):
    "Fates of `_with_fates` under names that are user data: a comma and a space, and an integer-like label."
    a = _with_fates(adata)
    a.uns["fb_fate_probs_fwd_names"] = np.array(list(names), dtype=object)
    return a


def _single(adata, w, name="L"):
    "A copy of `adata` whose only lineage has fate probabilities `w` (the right value for a merged lineage)."
    b = adata.copy()
    b.obsm["fb_fate_probs_fwd"] = np.asarray(w, float)[:, None]
    b.uns["fb_fate_probs_fwd_names"] = np.array([name], dtype=object); b.uns.pop("fb_fate_probs_fwd_colors", None)
    return b


def test_lineage_names_are_user_data(dg100):
    "Lineages named with commas and spaces, by integer label, and merged ('A, B' or a tuple = the summed fates)."
    from fatebook.trends import compute_gene_trends, plot_gene_trends, plot_heatmap, cluster_trends
    import matplotlib.pyplot as plt
    a = _named(dg100); genes = list(a.var_names[:6])
    kw = dict(time_key="latent_time", layer="Ms")
    before = a.copy()
    t_comma = compute_gene_trends(a, genes, "late, rising", **kw)
    t_int = compute_gene_trends(a, genes, 7, **kw)
    assert t_comma.lineages == ["late, rising"] and t_int.lineages == ["7"]
    ref = compute_gene_trends(_single(a, a.obsm["fb_fate_probs_fwd"][:, 1]), genes, **kw)
    np.testing.assert_allclose(t_int.fits["7"].mean, ref.fits["L"].mean, rtol=1e-12)
    # merged: the weights are the summed fate probabilities
    p = a.obsm["fb_fate_probs_fwd"]
    merged = compute_gene_trends(a, genes, [("late, rising", 7)], **kw)
    assert merged.lineages == ["late, rising, 7"] and merged.groups["late, rising, 7"] == ["late, rising", "7"]
    ref = compute_gene_trends(_single(a, p.sum(1)), genes, **kw)
    np.testing.assert_allclose(merged.fits["late, rising, 7"].mean, ref.fits["L"].mean, rtol=1e-12)
    np.testing.assert_array_equal(merged.cells["late, rising, 7"], ref.cells["L"])
    # plots take the same names, with or without precomputed trends
    fig = plot_gene_trends(a, genes[:2], 7, trends=t_int, **kw); assert fig.axes[0].get_title() == "7"; plt.close(fig)
    fig = plot_gene_trends(a, genes[:2], trends=merged, same_plot=True, **kw)
    assert [l.get_label() for l in fig.axes[0].get_lines()] == ["late, rising, 7"]; plt.close(fig)
    fig = plot_heatmap(a, genes, trends=merged, **kw); assert list(fig.fatebook_order) == ["late, rising, 7"]; plt.close(fig)
    assert cluster_trends(t_int, 7, n_clusters=2)["cluster"].nunique() == 2
    # the trends and plots write nothing (their docstrings say so)
    assert a.obs.equals(before.obs) and set(a.obsm) == set(before.obsm) and set(a.uns) == set(before.uns)
    assert all(np.array_equal(a.obsm[k], before.obsm[k]) for k in a.obsm) and set(a.layers) == set(before.layers)
    with pytest.raises(KeyError, match="Unknown lineage 'late'"):
        compute_gene_trends(a, genes, "late", **kw)
    with pytest.raises(KeyError, match=r"not in the given `trends`"):
        plot_gene_trends(a, genes[:2], "late, rising", trends=t_int, **kw)


def test_nan_times_are_left_out(dg100):
    "Cells with a NaN time are left out with a warning: the fit equals the one on the other cells."
    from fatebook.trends import compute_gene_trends
    a = _with_fates(dg100); genes = list(a.var_names[:5])
    a.obs["t_nan"] = a.obs["latent_time"].to_numpy().copy()
    nan = np.zeros(a.n_obs, bool); nan[[3, 17, 40, 41]] = True
    a.obs.loc[nan, "t_nan"] = np.nan
    with fatebook_log() as msgs:
        tr = compute_gene_trends(a, genes, "late", time_key="t_nan", layer="Ms")
    assert any("4 cell(s) with a NaN or infinite `t_nan`" in m for m in msgs)
    ref = compute_gene_trends(a[~nan].copy(), genes, "late", time_key="t_nan", layer="Ms")
    np.testing.assert_allclose(tr.fits["late"].mean, ref.fits["late"].mean, rtol=1e-12)
    np.testing.assert_array_equal(a.obs_names[tr.cells["late"]], a[~nan].obs_names[ref.cells["late"]])
    a.obs["t_cat"] = a.obs["clusters"]
    with pytest.raises(TypeError, match="must hold a numeric pseudotime"):
        compute_gene_trends(a, genes, time_key="t_cat")


def test_tied_times(dg100):
    "Times rounded to 0.05: 'keep' fits every cell of the range, 'first' only the first of each time (CellRank's rule)."
    from fatebook.trends import compute_gene_trends, lineage_cells
    a = _with_fates(dg100); genes = list(a.var_names[:4])
    t = np.round(a.obs["latent_time"].to_numpy(), 2) // 0.05 * 0.05
    a.obs["t_tied"] = t
    w = a.obsm["fb_fate_probs_fwd"][:, 0]
    rows_k, w_k, x = lineage_cells(t, w, ties="keep")
    rows_f, w_f, x_f = lineage_cells(t, w, ties="first")
    np.testing.assert_array_equal(x, x_f)                                 # the same range
    xs, first = np.unique(t, return_index=True)
    inside = (xs >= x[0]) & (xs <= x[-1])
    np.testing.assert_array_equal(rows_f, first[inside])                 # by hand: first cell of each time value
    assert sorted(rows_k) == sorted(np.flatnonzero((t >= x[0]) & (t <= x[-1])))
    assert (np.diff(t[rows_k]) >= 0).all() and len(rows_k) >= 4 * len(rows_f)
    np.testing.assert_allclose(w_k, np.maximum(w[rows_k], 0.01))
    tk = compute_gene_trends(a, genes, "late", time_key="t_tied", layer="Ms")
    assert len(tk.cells["late"]) == len(rows_k)
    with pytest.raises(ValueError, match="only .* cell"):
        compute_gene_trends(a, genes, "late", time_key="t_tied", layer="Ms", ties="first")


def test_zero_genes_are_not_called_unconverged(dg100):
    from fatebook.trends import compute_gene_trends
    a = _with_fates(dg100); a.layers["Mz"] = a.layers["Ms"].copy(); a.layers["Mz"][:, 1] = 0
    with fatebook_log() as msgs:
        tr = compute_gene_trends(a, list(a.var_names[:3]), "late", time_key="latent_time", layer="Mz")
    assert any("1 gene(s) are zero in every fitted cell" in m and a.var_names[1] in m for m in msgs)
    assert not any("did not converge" in m for m in msgs)
    assert (tr.fits["late"].mean[1] == 0).all() and (tr.fits["late"].upper[1] == 0).all()


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(n_test_points=0), ValueError, "n_test_points=0 is out of range"),
    (dict(n_test_points=2.5), TypeError, "n_test_points must be an integer"),
    (dict(block_size=0), ValueError, "block_size=0 is out of range"),
    (dict(lam=-1), ValueError, "lam=-1 is out of range"),
    (dict(n_knots=3), ValueError, "n_knots=3 is out of range"),
    (dict(conf_int=2), ValueError, "conf_int=2 is out of range"),
    (dict(distribution="poisson"), ValueError, "distribution='poisson' is not valid"),
    (dict(step_control="sometimes"), ValueError, "step_control='sometimes' is not valid"),
    (dict(weight_threshold=(2, 0.1)), ValueError, "weight_threshold=2 is out of range"),
    (dict(ties="last"), ValueError, "ties='last' is not valid"),
    (dict(lineages=[]), ValueError, "No lineage selected"),
    (dict(genes=[]), ValueError, "No genes given"),
    (dict(time_range=(5, 6)), ValueError, r"the given time_range \(5, 6\) holds too few"),
    (dict(nknots=8), TypeError, "did you mean 'n_knots' for 'nknots'"),
])
def test_parameter_errors_name_value_and_fix(dg50, kw, exc, msg):
    from fatebook.trends import compute_gene_trends
    a = _with_fates(dg50)
    args = dict(genes=list(a.var_names[:2]), lineages="late", time_key="latent_time", layer="Ms"); args.update(kw)
    obs, obsm = a.obs.copy(), {k: v.copy() for k, v in a.obsm.items()}
    with pytest.raises(exc, match=msg):
        compute_gene_trends(a, **args)
    assert a.obs.equals(obs) and all(np.array_equal(obsm[k], a.obsm[k]) for k in obsm)   # nothing written


def test_cluster_trends_checks(dg100):
    from fatebook.trends import compute_gene_trends, cluster_trends
    a = _with_fates(dg100); a.layers["Mc"] = a.layers["Ms"].copy(); a.layers["Mc"][:, :3] = 2.0   # 3 constant genes
    tr = compute_gene_trends(a, list(a.var_names[:20]), "late", time_key="latent_time", layer="Mc")
    with fatebook_log() as msgs:
        cl = cluster_trends(tr, "late", n_clusters=2)
    assert any("3 flat or failed" in m for m in msgs) and not set(a.var_names[:3]) & set(cl.index)
    with pytest.raises(ValueError, match=r"n_clusters=40 is out of range: it must be an integer in \[2, 16\]"):
        cluster_trends(tr, "late", n_clusters=40)


# ---- what the confidence band covers ----------------------------------------------------------------------------
def test_band_coverage_simulation():
    """Known mean, gamma noise: the band formula covers the mean at the nominal rate when the smoother can follow it
    (10 splines, lam 0.1), and CellRank's default smoother (6 splines, lam 3) misses a narrow bump (its bias is not
    in the band; fit_gam's docstring says so). 300 cells, 200 replicates, one vectorised fit per setting."""
    from fatebook.trends import fit_gam
    rng = np.random.default_rng(0)
    n, R, shape = 300, 200, 4.0
    t = np.sort(rng.uniform(0, 1, n)); xt = np.linspace(0, 1, 40)
    smooth = lambda x: np.exp(0.5 + x - 1.2 * x ** 2)
    bump = lambda x: 1 + 3 * np.exp(-((x - 0.5) / 0.15) ** 2)
    cov = {}
    for name, f in [("smooth", smooth), ("bump", bump)]:
        Y = rng.gamma(shape, f(t)[:, None] / shape, size=(n, R))
        for model, kw in [("default", {}), ("flexible", dict(n_knots=10, lam=0.1))]:
            fit = fit_gam(t, Y, np.ones(n), x_test=xt, conf_int=0.95, **kw)
            cov[name, model] = ((fit.lower <= f(xt)) & (f(xt) <= fit.upper)).mean()
    # binomial sd of a mean over 200 x 40 correlated hits is ~0.01-0.02
    assert 0.92 <= cov["smooth", "flexible"] <= 0.98 and 0.92 <= cov["bump", "flexible"] <= 0.98, cov
    assert cov["bump", "default"] < 0.5 and cov["smooth", "default"] < 0.93, cov


def test_lineage_without_committed_cells_warns(dg100):
    "A lineage no cell is headed for (fates < 0.01 everywhere) fits every cell with the same weight: said loudly."
    from fatebook.trends import compute_gene_trends
    a = _with_fates(dg100)
    a.obsm["fb_fate_probs_fwd"][:, 1] = 0.001
    with fatebook_log() as msgs:
        tr = compute_gene_trends(a, list(a.var_names[:2]), time_key="latent_time", layer="Ms")
    assert any("Lineage 'mid': only 0 cell(s) have a fate probability >= 0.01" in m for m in msgs)
    assert not any("Lineage 'late'" in m for m in msgs)
    assert len(tr.cells["mid"]) == a.n_obs - 0                                   # the whole range (CellRank's rule)


def test_heatmap_genes_mode_refuses_huge_lists(dg50):
    from fatebook.trends import plot_heatmap
    a = _with_fates(dg50)
    with pytest.raises(ValueError, match="mode='genes' draws one panel per gene, and 101 genes"):
        plot_heatmap(a, list(a.var_names[:101]), time_key="latent_time", mode="genes")


def test_trends_accessors_take_names(dg50):
    from fatebook.trends import compute_gene_trends, plot_cluster_trends
    a = _named(dg50); genes = list(a.var_names[:3])
    tr = compute_gene_trends(a, genes, 7, time_key="latent_time", layer="Ms")
    assert tr.frame(7).shape == (3, 200) and tr.peak_time(7).name == "7_peak" and len(tr.x("7")) == 200
    with pytest.raises(ValueError, match="what='band' is not valid"):
        tr.frame(7, "band")
    with pytest.raises(KeyError, match="Unknown lineage 'late'"):
        tr.frame("late")
    with pytest.raises(ValueError, match="DataFrame `cluster_trends` returns"):
        plot_cluster_trends(pd.DataFrame({"cluster": [0, 1]}))
