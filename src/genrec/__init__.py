"""genrec: generative recommendation (HSTU, GenRank, DFGR, UniGRF) and its baselines in PyTorch."""

__version__ = "0.1.0"
