"""Directed single-cell fate mapping: kernels, sorted Schur, GPCCA, fate probabilities and drivers, literate and fast"""

__version__ = "0.1.0"
