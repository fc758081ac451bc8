"""bfloat16 kept bit-exact in HDF5 as raw uint16 bits (docs/tooling.md#bf16, option a).

h5py has no bfloat16 type, so a bf16 tensor is stored as its 16 raw bits with the dataset attribute
`dtype="bfloat16"`. The caller converts from torch (this package never imports torch)::

    bits = t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)   # writer side
    t = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)                    # reader side

Without torch, `bf16_bits_to_float32` decodes exactly (every bf16 value is a float32 value).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bf16_bits_to_float32", "float32_to_bf16_bits"]


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bfloat16 bits to float32, exactly (bf16 is the top half of a float32).

    Args:
        bits: uint16 (or int16) array of any shape, e.g. [T, L, d].

    Returns:
        float32 array of the same shape.

    Raises:
        TypeError: `bits` is not a 16-bit integer array.
    """
    bits = np.asarray(bits)
    if bits.dtype not in (np.uint16, np.int16):
        raise TypeError(f"bfloat16 bits must be uint16 (or int16), got dtype {bits.dtype}")
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round-to-nearest-even, as torch does) and return the bits.

    For tests and torch-free producers; NaNs stay NaN (quiet), infinities stay infinite.

    Args:
        values: float array of any shape (converted to float32 first).

    Returns:
        uint16 array of the same shape.
    """
    as_int = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((as_int >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((as_int + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    if nan.any():
        rounded[nan] = ((as_int[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded
