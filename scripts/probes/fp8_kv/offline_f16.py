"""bench_offline.py with the attention kernel's FP8_COMPUTE_DTYPE set to float16 first
(arguments as bench_offline.py's)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import jax.numpy as jnp  # noqa: E402

from kernels_pallas import ragged_paged_attention_triton as rpa  # noqa: E402

rpa.FP8_COMPUTE_DTYPE = jnp.float16
from scripts import bench_offline  # noqa: E402

bench_offline.main()
