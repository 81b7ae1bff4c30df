"""Parts that sum with the cuts: the sparse entries and the low-rank part."""
