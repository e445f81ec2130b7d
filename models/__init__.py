"""Model families, registered by the Hugging Face `architectures` name."""
from models import llama
from models.config import ModelConfig

# architectures name -> module with param_shapes / param_axes / forward / hf_weight_names
MODEL_REGISTRY = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "Qwen2ForCausalLM": llama,
    "Qwen3ForCausalLM": llama,
}


def get_model_module(config: ModelConfig):
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported; "
            f"supported: {', '.join(sorted(MODEL_REGISTRY))}") from None


__all__ = ["MODEL_REGISTRY", "ModelConfig", "get_model_module"]
