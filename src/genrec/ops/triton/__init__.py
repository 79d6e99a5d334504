"""Fused GPU attention: the ``triton`` backend lives in :mod:`genrec.ops.triton.backend` (imported
only when asked for, since it needs Triton); :mod:`genrec.ops.triton.tiles` is plain PyTorch."""
