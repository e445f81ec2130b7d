"""Engine configuration: every default lives here; CLI flags map onto these fields."""
from __future__ import annotations

import dataclasses

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_per_token")


@dataclasses.dataclass
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, or (dummy) config.json; None: SmolLM2
    load_format: str = "auto"  # auto | dummy
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None: the model's, capped at 2048 on CPU
    block_size: int = 16
    max_num_seqs: int | None = None  # None: 32 on CPU, 256 on GPU
    max_num_batched_tokens: int | None = None  # per-step token budget; None: 256 on CPU, 8192 on GPU
    # Fraction of each GPU's memory JAX's allocator may take (weights, K/V cache, activations),
    # as vLLM's flag of that name. None: XLA_PYTHON_CLIENT_MEM_FRACTION where set, else 0.9
    # (JAX's own default of 0.75 would leave a quarter of the GPU to nothing).
    gpu_memory_utilization: float | None = None
    kv_cache_memory_gb: float | None = None  # None: 1 GiB on CPU, 90% of what the weights leave on GPU
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb
    # auto: the model's dtype. fp8: float8_e4m3fn with a scale of 1 (as vLLM's fp8 cache
    # without calibrated scales), values past +-448 saturated: half the bytes of bf16, so
    # twice the tokens in the same memory and half the K/V reads of decode attention.
    # fp8_per_token: float8 rows with a float32 scale per token and KV head (ScaledCache):
    # small values keep their mantissa, none saturate; 3% more bytes, slower kernels.
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    attn_impl: str = "auto"  # auto | xla | pallas
    seed: int = 0  # seeds the per-request seeds of requests that give none
    compile_at_startup: bool = True  # compile every shape bucket before serving, then forbid compiles
    compile_threads: int | None = None  # programs compiled at once; None: 1 on CPU, 8 on GPU
    # Decode steps per launch for small decode-only batches (the host queues one launch for
    # several tokens). None: on GPU 4 if start-up measures the host as the bottleneck of a
    # small step, else 1 (4 without compile_at_startup); on CPU 1. For batches of at most
    # multi_step_max_seqs sequences; each bucket up to there gets two more programs.
    num_scheduler_steps: int | None = None
    multi_step_max_seqs: int = 8
    # Batch-1 decode steps with every layer in one persistent kernel (Mosaic GPU, NVIDIA
    # Hopper; Llama-shaped models, contexts up to 1,024 tokens; docs/performance.md).
    # auto: where the GPU and the model allow it; on: an error where they do not; off.
    decode_kernel: str = "off"

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks",
                     "compile_threads", "num_scheduler_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        util = self.gpu_memory_utilization
        if util is not None and not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.decode_kernel == "on":
            raise ValueError("decode_kernel on needs a cache in the model's dtype, not "
                             f"kv_cache_dtype {self.kv_cache_dtype}")
        if self.decode_kernel not in ("auto", "on", "off"):
            raise ValueError(f"decode_kernel must be auto, on or off, got {self.decode_kernel!r}")
        if self.attn_impl not in ("auto", "xla", "pallas"):
            raise ValueError(f"attn_impl must be auto, xla or pallas, got {self.attn_impl!r}")
