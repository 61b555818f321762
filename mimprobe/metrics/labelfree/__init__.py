"""Label-free block metrics (no labels needed) and their calibration against the labelled ones (issue 21).

Each metric is a pure function of one block's (n, d) features, usually a seeded subset of a split
(`seeded_subset`), and returns a `LabelFreeEstimate` (value, standard error where the estimator has one, params):

- `twonn_dimension`: TwoNN intrinsic dimension (Facco et al. 2017), checked against scikit-dimension;
- `alpha_req`: power-law decay of the covariance spectrum (Agrawal et al. 2022);
- `nesum`: normalised eigenvalue sum (He & Ozay 2022);
- `dataset_entropy`: matrix-based Renyi entropy of the normalised Gram matrix (Skean et al. 2025);
- `neighbourhood_overlap` / `overlap_of_neighbours`: shared k nearest neighbours of consecutive blocks (Doimo et
  al. 2020);
- `cluster_learnability`: k-NN accuracy on k-means pseudo-labels (CLID's CL, Lu et al. 2022);
- RankMe stays in `mimprobe.metrics.rank`.

`calibration` compares a label-free curve across blocks with a k-NN or linear top-1 curve: Spearman's rho with a
bootstrap interval over images, the block each metric's published rule picks (`RULES`) and the accuracy lost there.
"""

from .calibration import (PICKS, RULES, CalibrationResult, PickRule, bootstrap_accuracy, bootstrap_indices,
                          calibrate, first_min_after_peak, oriented_score, pick_block, spearman_rho, spearman_rows)
from .entropy import dataset_entropy, renyi_entropy_from_eigenvalues
from .intrinsic_dim import two_nearest_distances, twonn_dimension, twonn_from_distances
from .learnability import cluster_learnability, default_cluster_count, learnability_split
from .overlap import block_neighbours, neighbourhood_overlap, overlap_of_neighbours
from .spectrum import alpha_req, alpha_req_from_spectrum, covariance_eigenvalues, nesum, nesum_from_spectrum
from .subset import LabelFreeEstimate, Subset, seeded_subset

__all__ = ["PICKS", "RULES", "CalibrationResult", "LabelFreeEstimate", "PickRule", "Subset", "alpha_req",
           "alpha_req_from_spectrum", "block_neighbours", "bootstrap_accuracy", "bootstrap_indices", "calibrate",
           "cluster_learnability", "covariance_eigenvalues", "dataset_entropy", "default_cluster_count",
           "first_min_after_peak", "learnability_split", "neighbourhood_overlap", "nesum", "nesum_from_spectrum",
           "oriented_score", "overlap_of_neighbours", "pick_block", "renyi_entropy_from_eigenvalues",
           "seeded_subset", "spearman_rho", "spearman_rows", "two_nearest_distances", "twonn_dimension",
           "twonn_from_distances"]
