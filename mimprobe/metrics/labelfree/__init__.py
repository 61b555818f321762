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

from ..._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "PICKS": ".calibration", "RULES": ".calibration", "CalibrationResult": ".calibration", "PickRule": ".calibration", "bootstrap_accuracy": ".calibration", "bootstrap_indices": ".calibration", "calibrate": ".calibration", "first_min_after_peak": ".calibration", "oriented_score": ".calibration", "pick_block": ".calibration", "spearman_rho": ".calibration", "spearman_rows": ".calibration",
    "dataset_entropy": ".entropy", "renyi_entropy_from_eigenvalues": ".entropy",
    "two_nearest_distances": ".intrinsic_dim", "twonn_dimension": ".intrinsic_dim", "twonn_from_distances": ".intrinsic_dim",
    "cluster_learnability": ".learnability", "default_cluster_count": ".learnability", "learnability_split": ".learnability",
    "block_neighbours": ".overlap", "neighbourhood_overlap": ".overlap", "overlap_of_neighbours": ".overlap",
    "alpha_req": ".spectrum", "alpha_req_from_spectrum": ".spectrum", "covariance_eigenvalues": ".spectrum", "nesum": ".spectrum", "nesum_from_spectrum": ".spectrum",
    "LabelFreeEstimate": ".subset", "Subset": ".subset", "seeded_subset": ".subset",
})
