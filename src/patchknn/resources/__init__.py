"""Data files shipped with patchknn (the paper's Table 2)."""
