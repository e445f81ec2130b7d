"""Custom ops: each file holds a Pallas kernel, its XLA reference and a dispatcher."""
from kernels_pallas.ragged_paged_attention import (
    ScaledCache,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_and_attend,
    write_kv_to_pages,
)

__all__ = ["ScaledCache", "ragged_paged_attention", "ragged_paged_attention_reference",
           "write_kv_and_attend", "write_kv_to_pages"]
