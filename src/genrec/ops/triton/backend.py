"""The ``triton`` attention backend: fused GPU kernels with the signatures of
:mod:`genrec.ops.reference.attention` (HSTU pointwise attention: our own Triton kernels; softmax
attention: ``flex_attention``). Importing it needs Triton; running it needs a CUDA device."""

from genrec.ops.dispatch import AttentionBackend
from genrec.ops.triton.flex import softmax_attention
from genrec.ops.triton.hstu import hstu_attention

TRITON = AttentionBackend("triton", hstu_attention, softmax_attention)
