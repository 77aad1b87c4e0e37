"""The algorithms the methods are built on, each in its own module: k-means with PCA whitening
(DeepCluster), SeLa's Sinkhorn-Knopp, and AET's projective warps."""
