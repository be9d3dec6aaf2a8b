"""Directed single-cell fate mapping: kernels, sorted Schur, GPCCA, fate probabilities and drivers, literate and fast

Modules:

- `fatebook.fate`: The `Lineage` array, fate (absorption) probabilities, absorption times and unreachable-cell detection — pure functions on a transition matrix and a set of terminal cells.
- `fatebook.linalg`: Shared sparse linear algebra: threads for large sparse products, block GMRES with deflation, the I − Q operator and the solver choice, strongly connected components and recurrent classes, and synthetic test chains.
- `fatebook.schur`: Sorted real Schur decompositions (dense, ARPACK, SLEPc), forbidden numbers of states, the eigengap, the eigendecomposition used by CFLARE and stationary distributions of (possibly reducible) chains.
- `fatebook.trends`: Gene expression trends along lineages: a penalised-spline GAM of expression against pseudotime, weighted by each lineage's fate probabilities, fitted for thousands of genes at once; trend plots, heatmaps and trend clusters."""

__version__ = "0.1.0"
