"""pykeops-style import path: ``from lazymat.torch.cluster import grid_cluster, from_matrix``."""

from ..ranges import *  # noqa: F403  (the same helpers for numpy and torch)
from ..ranges import __all__  # noqa: F401
