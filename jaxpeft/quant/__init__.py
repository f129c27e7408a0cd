"""4-bit (and 8-bit) quantized base weights: the storage half of QLoRA.

Public API::

    q = quantize_array(w, scheme="nf4", block_size=64, double_quant=True)   # QuantizedArray
    w_hat = dequantize_array(q, jnp.bfloat16)                                # inside jit
    y = qmatmul(x, q, jnp.bfloat16)                                          # x @ dequantize(q)
    y = qmatmul_blockwise(x, q)    # same, one dequantized row block at a time (forward and backward)
    y = qeinsum_blockwise("btd,ndh->btnh", x, q)   # any layer's einsum, the same way
    qparams = quantize(params)            # every >= 2-D float leaf named "kernel"
    print(quant_summary(qparams))         # bits per parameter, bytes saved

See ``docs/quantization.md`` for the byte layout.
"""

from jaxpeft.quant._array import (
    SCHEMES,
    QuantizedArray,
    dequantize_array,
    einsum,
    qmatmul,
    quantize_array,
)
from jaxpeft.quant._matmul import DEFAULT_BLOCK_BYTES, qeinsum_blockwise, qmatmul_blockwise, row_blocks
from jaxpeft.quant._codebooks import DYNAMIC_MAP, FP4_VALUES, INT4_VALUES, NF4_VALUES
from jaxpeft.quant._tree import QuantSummary, dequantize, is_quantized, quant_summary, quantize

__all__ = [
    "SCHEMES",
    "NF4_VALUES",
    "FP4_VALUES",
    "INT4_VALUES",
    "DYNAMIC_MAP",
    "QuantizedArray",
    "QuantSummary",
    "quantize_array",
    "dequantize_array",
    "quantize",
    "dequantize",
    "is_quantized",
    "quant_summary",
    "qmatmul",
    "qmatmul_blockwise",
    "qeinsum_blockwise",
    "row_blocks",
    "DEFAULT_BLOCK_BYTES",
    "einsum",
]
