"""atom-jax: an LLM inference engine on JAX."""
from atom_jax.config import EngineConfig
from atom_jax.engine import LLM, EngineCore
from atom_jax.outputs import CompletionOutput, RequestOutput
from atom_jax.sampling_params import SamplingParams

__all__ = ["LLM", "EngineCore", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
