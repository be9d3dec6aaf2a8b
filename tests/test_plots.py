"""Integration tests for fatebook.plots: structure, not pixels (unit tests live in nbs/09_plots.ipynb)."""
import os

import matplotlib
matplotlib.use("agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from fatebook import plots as P
from fatebook.core import Key, MissingKeyError, settings

settings.progress_bar = False


def panels(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def legend(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _kernel(adata):
    from fatebook.kernels import ConnectivityKernel, VelocityKernel
    return 0.8 * VelocityKernel(adata).compute_transition_matrix() + 0.2 * ConnectivityKernel(adata).compute_transition_matrix()


@pytest.fixture
def dg_gpcca(dg200):
    from fatebook.estimators import GPCCA
    g = GPCCA(_kernel(dg200))
    g.compute_schur(n_components=10)
    g.compute_macrostates(n_states=6, n_cells=10, cluster_key="clusters", optimizer="nelder-mead")  # CellRank's names (OL)
    g.set_terminal_states_from_macrostates(["Granule mature", "Astrocytes", "OL"])
    g.compute_fate_probabilities()
    g.compute_lineage_drivers(show_progress=False)
    return g


# ---- fast: dentate gyrus (200 cells) ---------------------------------------------------------------------------------
def test_plotting_before_computing_names_the_call(dg200):
    from fatebook.estimators import GPCCA
    g = GPCCA(_kernel(dg200))
    for fn, call in [(P.plot_spectrum, "compute_schur()"), (P.plot_schur, "compute_schur()"),
                     (P.plot_macrostates, "compute_macrostates()"), (P.plot_coarse_T, "compute_macrostates()"),
                     (P.plot_terminal_states, "set_terminal_states()"),
                     (P.plot_fate_probabilities, "compute_fate_probabilities()"),
                     (lambda g: P.plot_lineage_drivers(g, "A"), "compute_lineage_drivers()"),
                     (P.plot_schur_matrix, "compute_schur()")]:
        with pytest.raises(P.NotComputedError, match=call.replace("(", r"\(").replace(")", r"\)")):
            fn(g)


def test_missing_embedding_says_how_to_compute_it(dg_gpcca):
    del dg_gpcca.adata.obsm["X_umap"]
    for fn in (P.plot_fate_probabilities, P.plot_macrostates, P.plot_terminal_states,
               lambda g: P.plot_schur(g), lambda g: P.plot_lineage_drivers(g, "OL")):
        with pytest.raises(MissingKeyError, match=r"obsm\['X_umap'\].*sc\.tl\.umap"):
            fn(dg_gpcca)
    with pytest.raises(MissingKeyError, match=r"obsm\['X_tsne'\].*sc\.tl\.tsne"):
        P.plot_fate_probabilities(dg_gpcca, basis="tsne")


def test_estimator_and_kernel_methods_delegate(dg_gpcca):
    g = dg_gpcca
    for name in ("plot_spectrum", "plot_schur", "plot_macrostates", "plot_terminal_states", "plot_fate_probabilities",
                 "plot_absorption_probabilities", "plot_coarse_T", "plot_schur_matrix"):
        assert isinstance(getattr(g, name)(), Figure), name
    assert isinstance(g.plot_lineage_drivers("OL", n_genes=2), Figure)
    assert isinstance(g.plot_lineage_drivers_correlation("OL", "Astrocytes"), Figure)
    assert isinstance(g.plot_macrostate_composition("clusters"), Figure)
    assert isinstance(g.kernel.plot_projection(), Figure)
    assert isinstance(g.kernel.plot_random_walks(n_sims=5, max_iter=5), Figure)


def test_plots_do_not_touch_the_anndata(dg_gpcca):
    a = dg_gpcca.adata
    before = {s: set(getattr(a, s).keys()) for s in ("obs", "obsm", "uns", "varm", "obsp", "layers")}
    X0 = a.obsm["X_umap"].copy()
    for f in (P.plot_spectrum, P.plot_schur, P.plot_macrostates, P.plot_fate_probabilities, P.plot_coarse_T,
              lambda g: P.plot_lineage_drivers(g, "OL"), lambda g: P.aggregate_fate_probabilities(g.adata)):
        f(dg_gpcca)
    assert before == {s: set(getattr(a, s).keys()) for s in before}
    np.testing.assert_array_equal(a.obsm["X_umap"], X0)


def test_projection_key_follows_direction(dg200):
    from fatebook.kernels import VelocityKernel
    P.plot_projection(VelocityKernel(dg200, backward=True).compute_transition_matrix())
    assert Key.obsp.T(True) + "_umap" in dg200.obsm
    assert Key.obsp.T(False) + "_umap" not in dg200.obsm


def test_projection_title_names_the_kernels(dg200):
    "A newcomer's run titled the projection of 0.8 vk + 0.2 ck 'KernelAdd: ...' (the class of the sum)."
    from fatebook.kernels import VelocityKernel, ConnectivityKernel
    from fatebook.estimators import GPCCA
    vk = VelocityKernel(dg200).compute_transition_matrix(); ck = ConnectivityKernel(dg200).compute_transition_matrix()
    k = 0.8 * vk + 0.2 * ck
    for obj, label in [(vk, "VelocityKernel"), (k, "0.8·VelocityKernel + 0.2·ConnectivityKernel"), (GPCCA(k), None)]:
        title = P.plot_projection(obj).axes[0].get_title()
        assert title.startswith(label or "0.8·VelocityKernel + 0.2·ConnectivityKernel") and "Kernel" + "Add" not in title, title
        assert title.endswith("forward transitions projected onto umap"), title
    k.write_to_adata()                                   # an estimator read back from the AnnData names the same kernel
    GPCCA(k).compute_schur(n_components=4)              # (writes its results and the kernel's repr to the AnnData)
    assert P._kernel_label(GPCCA.from_adata(dg200)) == "0.8·VelocityKernel + 0.2·ConnectivityKernel"
    plt.close("all")


def test_aggregate_reads_a_written_and_reread_anndata(dg_gpcca, tmp_path):
    import anndata as ad
    path = tmp_path / "dg.h5ad"
    dg_gpcca.adata.write_h5ad(path)
    a = ad.read_h5ad(path)
    fig = P.aggregate_fate_probabilities(a, mode="bar", clusters=["Neuroblast", "Granule mature"])
    bars = panels(fig)[0].patches
    assert [to_hex(b.get_facecolor()) for b in bars] == list(dg_gpcca.fate_probabilities.colors)
    B = np.asarray(dg_gpcca.fate_probabilities)[(a.obs.clusters == "Neuroblast").to_numpy()]
    np.testing.assert_allclose([b.get_height() for b in bars], B.mean(0), atol=1e-12)
    assert [a_.get_title() for a_ in panels(P.cluster_fates(a, mode="violin"))] == ["Granule mature", "Astrocytes", "OL"]


def test_save_writes_a_png(dg_gpcca, tmp_path):
    out = tmp_path / "coarse.png"
    fig = P.plot_coarse_T(dg_gpcca, save=str(out))
    assert isinstance(fig, Figure) and out.stat().st_size > 5_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- slow: pancreas, the seed tutorial's figures --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pancreas_gpcca(_pancreas_pp_session):
    "GPCCA on the preprocessed pancreas (the file holds 2,000 of the original genes)."
    from fatebook.estimators import GPCCA
    adata = _pancreas_pp_session.copy()
    g = GPCCA(_kernel(adata))
    g.compute_schur(n_components=20)
    g.compute_macrostates(n_states=12, cluster_key="clusters")
    g.set_terminal_states_from_macrostates(["Alpha", "Beta", "Epsilon", "Delta"])
    g.compute_fate_probabilities()
    g.compute_lineage_drivers(show_progress=False)
    return g


@pytest.mark.slow
def test_pancreas_every_plot(pancreas_gpcca, tmp_path):
    g = pancreas_gpcca
    lin = ["Alpha", "Beta", "Epsilon", "Delta"]
    calls = {
        "spectrum": (lambda s: P.plot_spectrum(g, save=s), None),
        "schur": (lambda s: P.plot_schur(g, use=3, save=s), ["Schur vector 1", "Schur vector 2", "Schur vector 3"]),
        "macro": (lambda s: P.plot_macrostates(g, save=s), ["macrostate membership"]),
        "macro_sep": (lambda s: P.plot_macrostates(g, same_plot=False, save=s), list(g.macrostates.cat.categories)),
        "macro_disc": (lambda s: P.plot_macrostates(g, discrete=True, save=s), ["macrostates"]),
        "terminal": (lambda s: P.plot_terminal_states(g, save=s), ["terminal states"]),
        "fates": (lambda s: P.plot_fate_probabilities(g, same_plot=False, save=s), lin),
        "coarse": (lambda s: P.plot_coarse_T(g, save=s), ["coarse-grained transition matrix", "", ""]),
        "drivers": (lambda s: P.plot_lineage_drivers(g, "Alpha", n_genes=5, save=s), None),
        "violin": (lambda s: P.aggregate_fate_probabilities(g.adata, mode="violin", lineages=["Alpha", "Beta"],
                                                            clusters=["Ngn3 high EP", "Pre-endocrine", "Alpha", "Beta"], save=s),
                   ["Alpha", "Beta"]),
        "projection": (lambda s: P.plot_projection(g.kernel, save=s), None),
        "walks": (lambda s: P.plot_random_walks(g.kernel, n_sims=50, start_ixs={"clusters": ["Ngn3 low EP"]}, save=s), None),
    }
    for name, (fn, titles) in calls.items():
        out = tmp_path / f"{name}.png"
        fig = fn(str(out))
        assert isinstance(fig, Figure), name
        assert out.stat().st_size > 5_000, name
        if titles is not None:
            assert [a.get_title() for a in panels(fig)] == titles, name
        plt.close(fig)
    # drivers: Gcg first, with a q-value a person can read (it underflows to 0 here: 'q<1e-300', not 'q=0.0e+00')
    fig = P.plot_lineage_drivers(g, "Alpha", n_genes=3)
    first = panels(fig)[0].get_title()
    assert first.startswith("Gcg\n") and ("q=" in first or "q<1e-300" in first) and "0.0e+00" not in first


@pytest.mark.slow
def test_pancreas_lineage_colours_are_stable(pancreas_gpcca):
    g = pancreas_gpcca
    want = dict(zip(g.fate_probabilities.names, g.fate_probabilities.colors))
    # 1. terminal-state legend
    ax = panels(P.plot_terminal_states(g))[0]
    got = {c.get_label(): to_hex(c.get_facecolor()[0]) for c in ax.collections if c.get_label() in want}
    assert got == want
    # 2. fate probabilities in one panel
    ax = panels(P.plot_fate_probabilities(g, same_plot=True))[0]
    got = {c.get_label(): to_hex(c.get_facecolor()[0]) for c in ax.collections if c.get_label() in want}
    assert got == want
    # 3. bars of the cluster aggregate
    bars = panels(P.aggregate_fate_probabilities(g.adata, mode="bar", clusters=["Alpha"]))[0].patches
    assert [to_hex(b.get_facecolor()) for b in bars] == [want[n] for n in g.fate_probabilities.names]
    # 4. the terminal states take the colours of their clusters (majority vote names them)
    cc = P.category_colors(g.adata, "clusters")
    assert want["Alpha"] == cc["Alpha"] and want["Beta"] == cc["Beta"]


@pytest.mark.slow
def test_pancreas_coarse_T_has_one_colour_range(pancreas_gpcca):
    g = pancreas_gpcca
    fig = P.plot_coarse_T(g, show_initial_dist=True, show_stationary_dist=True)
    ims = [im for a in fig.axes for im in a.get_images()]
    assert len(ims) == 3
    vals = np.concatenate([g.coarse_T.to_numpy().ravel(), g.coarse_stationary_distribution.to_numpy(),
                           g.coarse_initial_distribution.to_numpy()])
    for im in ims:
        assert (im.norm.vmin, im.norm.vmax) == (pytest.approx(vals.min()), pytest.approx(vals.max()))
    k = len(g.coarse_T)
    assert len(fig.axes[0].texts) == k * k


@pytest.mark.slow
def test_pancreas_spectrum_marks_forbidden(pancreas_gpcca):
    g = pancreas_gpcca
    fig = P.plot_spectrum(g, real_only=True)
    ax = panels(fig)[0]
    forb = [m for m in g.eigendecomposition["forbidden"] if m < len(g.eigendecomposition["D"])]
    red = [int(t.get_text()) for t in ax.get_xticklabels() if t.get_color() == "tab:red"]
    assert red == forb and len(forb) > 0
    assert f"eigengap (n_states = {g.eigendecomposition['eigengap'] + 1})" in legend(ax)


def test_initial_states_and_stable_macrostate_colours(dg_gpcca):
    g = dg_gpcca
    name = [m for m in g.macrostates.cat.categories if m.startswith("Neuroblast")][0]
    g.set_initial_states_from_macrostates([name])
    ax = panels(P.plot_initial_states(g))[0]
    assert legend(ax) == [name] and ax.get_title() == "initial states"
    macro_colour = dict(zip(g.macrostates_memberships.names, g.macrostates_memberships.colors))[name]
    got = [to_hex(c.get_facecolor()[0]) for c in ax.collections if c.get_label() == name]
    assert got == [macro_colour]
    # the same state has the same colour in the macrostate plot
    ax = panels(P.plot_macrostates(g, discrete=True))[0]
    assert [to_hex(c.get_facecolor()[0]) for c in ax.collections if c.get_label() == name] == [macro_colour]


def test_eigendecomposition_plot(dg_gpcca):
    g = dg_gpcca
    g.compute_eigendecomposition(k=6)
    fig = P.plot_eigendecomposition(g, use=[1, 2])
    assert [a.get_title().split(" = ")[0] for a in panels(fig)] == ["λ_1", "λ_2"]
    g.compute_eigendecomposition(k=6, only_evals=True)
    g.eigendecomposition.pop("V_r", None)
    with pytest.raises(P.NotComputedError, match="compute_eigendecomposition"):
        P.plot_eigendecomposition(g)


_CR_PROJECTION = r'''
import sys
import numpy as np, scipy.sparse as sp, anndata as ad
from cellrank.kernels import PrecomputedKernel
from cellrank.kernels.utils._projection import TmatProjection
a = np.load(sys.argv[1])
T = sp.load_npz(sys.argv[2]); C = sp.load_npz(sys.argv[3])
adata = ad.AnnData(np.zeros((T.shape[0], 1)), obsm={"X_umap": a["E"]})
k = PrecomputedKernel(T, adata=adata)
TmatProjection(k, basis="umap").project(connectivities=C)
np.save(sys.argv[4], adata.obsm["T_fwd_umap"])
'''


@pytest.mark.parity
def test_projection_parity_with_cellrank(cellrank_python, dg200, tmp_path):
    """Our projection equals CellRank 2.3.3's TmatProjection up to its global 1/(3 * quiver autoscale) factor."""
    import subprocess
    import scipy.sparse as sp
    k = _kernel(dg200)
    T, C, E = k.transition_matrix, dg200.obsp["connectivities"], np.asarray(dg200.obsm["X_umap"][:, :2], float)
    np.savez(tmp_path / "in.npz", E=E)
    sp.save_npz(tmp_path / "T.npz", sp.csr_matrix(T)); sp.save_npz(tmp_path / "C.npz", sp.csr_matrix(C))
    (tmp_path / "ref.py").write_text(_CR_PROJECTION)
    r = subprocess.run([str(cellrank_python), str(tmp_path / "ref.py"), str(tmp_path / "in.npz"), str(tmp_path / "T.npz"),
                        str(tmp_path / "C.npz"), str(tmp_path / "ref.npy")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = np.load(tmp_path / "ref.npy")
    ours = P.project_transition_matrix(T, E, C)
    scale = np.linalg.lstsq(ours.reshape(-1, 1), ref.reshape(-1), rcond=None)[0][0]
    assert scale > 0
    np.testing.assert_allclose(ours * scale, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
