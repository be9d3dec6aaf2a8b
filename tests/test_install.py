"""The environment the README's test command builds: fatebook imports, the public API is where the docs say,
and the optional PETSc/SLEPc extra is installed and works (tools/install_petsc.sh)."""
import subprocess, sys

import numpy as np
import pytest


def test_public_imports():
    import fatebook
    from fatebook.datasets import pancreas, simulate  # noqa: F401
    from fatebook.kernels import VelocityKernel, ConnectivityKernel, PseudotimeKernel, PalantirKernel  # noqa: F401
    from fatebook.estimators import GPCCA, CFLARE  # noqa: F401
    assert fatebook.__version__


def test_import_does_not_pull_petsc():
    """The default path never needs PETSc: importing the whole API must not import petsc4py/slepc4py."""
    code = ("import sys, fatebook.kernels, fatebook.estimators, fatebook.schur, fatebook.fate, fatebook.plots; "
            "from fatebook.estimators import GPCCA; "
            "print(any(m.split('.')[0] in ('petsc4py', 'slepc4py') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_petsc_extra_installed_and_working():
    """`import petsc4py, slepc4py` works in the test environment, and SLEPc solves a small eigenproblem."""
    import petsc4py, slepc4py
    petsc4py.init(); slepc4py.init()
    from petsc4py import PETSc
    from slepc4py import SLEPc
    n = 30
    A = PETSc.Mat().createAIJ([n, n], nnz=1)
    for i in range(n): A.setValue(i, i, float(i + 1))
    A.assemble()
    E = SLEPc.EPS().create(); E.setOperators(A); E.setDimensions(3)
    E.setWhichEigenpairs(SLEPc.EPS.Which.LARGEST_REAL); E.solve()
    assert E.getConverged() >= 3
    vals = sorted((E.getEigenvalue(i).real for i in range(3)), reverse=True)
    np.testing.assert_allclose(vals, [30, 29, 28], rtol=1e-8)
