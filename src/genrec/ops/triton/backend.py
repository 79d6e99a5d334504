"""The ``triton`` attention backend: fused GPU kernels with the signatures of
:mod:`genrec.ops.reference.attention` (HSTU pointwise attention: our own Triton kernels; softmax
attention: ``flex_attention``). Importing it needs Triton; running it needs a CUDA device (or, for
the HSTU kernels on tiny shapes in the tests, Triton's CPU interpreter)."""

from functools import partial

from genrec.ops.dispatch import AttentionBackend
from genrec.ops.triton.flex import softmax_attention
from genrec.ops.triton.hstu import DEFAULT_CONFIG, KernelConfig, hstu_attention, prepare_attention


def triton_backend(config: KernelConfig = DEFAULT_CONFIG) -> AttentionBackend:
    """The backend with the HSTU kernels' tile shapes and dQ strategy fixed to ``config``."""
    return AttentionBackend("triton", partial(hstu_attention, config=config), softmax_attention,
                            partial(prepare_attention, config=config))


TRITON = triton_backend()
