"""Directed single-cell fate mapping: kernels, sorted Schur, GPCCA, fate probabilities and drivers, literate and fast

Modules:

- `fatebook.fate`: The `Lineage` array, fate (absorption) probabilities, absorption times and unreachable-cell detection — pure functions on a transition matrix and a set of terminal cells.
- `fatebook.schur`: Sorted real Schur decompositions (dense, ARPACK, SLEPc), forbidden numbers of states, the eigengap, the eigendecomposition used by CFLARE and stationary distributions of (possibly reducible) chains."""

__version__ = "0.1.0"
