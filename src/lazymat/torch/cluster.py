"""pykeops-style import path: ``from lazymat.torch.cluster import grid_cluster, from_matrix``."""

from ..ranges import (
                      cluster_centroids,
                      cluster_ranges,
                      cluster_ranges_centroids,
                      from_matrix,
                      grid_cluster,
                      sort_clusters,
                      swap_axes,
)

__all__ = ["grid_cluster", "sort_clusters", "cluster_ranges", "cluster_centroids",
           "cluster_ranges_centroids", "from_matrix", "swap_axes"]
