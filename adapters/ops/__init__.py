"""The algorithms the methods are built on, each in its own module: k-means with PCA whitening
(DeepCluster), SeLa's Sinkhorn-Knopp, AET's projective warps, and the NMI between two labelings
that DeepCluster and SeLa log of their clusters."""
