"""Shared fixtures for the ops tests: random *valid* GGUF blocks of every type and a tiny GGUF writer."""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

# Byte offsets of the f16 scale fields inside one block, per type (docs/spec.md §G3).
F16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,),
}
QUANT_TYPES = list(F16_FIELDS)


def random_blocks(qtype, rows, cols, rng):
    """Random packed data of logical shape (rows, cols): random quant bytes, random finite f16 scales
    (normal and subnormal, both signs) -- every block valid, none all-zero."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    data = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        magnitude = np.exp(rng.uniform(np.log(1e-7), np.log(2.0), size=n_blocks))
        scale = (magnitude * rng.choice([-1.0, 1.0], size=n_blocks)).astype(np.float16)
        data[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(rows, cols // block_size * type_size)



# The Triton kernels as (type, variant) pairs: variant None is the type's kernel, "gather" the first Q4_K kernel.
TRITON_KERNELS = [(Q.Q4_K, None), (Q.Q4_K, "gather"), (Q.Q6_K, None), (Q.Q8_0, None)]


def triton_kernel_id(case):
    qtype, variant = case
    return qtype.name + (f"-{variant}" if variant else "")
