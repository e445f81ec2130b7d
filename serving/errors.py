"""One error type for both servers: an HTTP status and OpenAI's error shape, or a gRPC code."""
from __future__ import annotations

import re

import grpc

from atom_jax.async_llm import EngineError, EngineUnavailableError, QueueFullError

RETRY_AFTER_SECONDS = 1

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 grpc_code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.grpc_code = grpc_code or _GRPC_CODES.get(status, grpc.StatusCode.UNKNOWN)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status in (429, 503) else {}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param if param is not None else param_of(message))


def param_of(message: str) -> str | None:
    """The parameter a validation message starts with ("temperature must be ..." -> temperature)."""
    m = re.match(r"([a-z_][a-z0-9_]*)[ :]", message)
    return m.group(1) if m else None


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> APIError:
    if max_tokens is None or prompt_tokens >= max_model_len:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your "
               f"request has {prompt_tokens} input tokens and at least one token must be "
               "generated. Please reduce the length of the input.")
        return APIError(400, msg, param="prompt", code="context_length_exceeded")
    msg = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
           "completion). Please reduce the length of the prompt or completion.")
    return APIError(400, msg, param="max_tokens", code="context_length_exceeded")


def check_context_length(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> None:
    if prompt_tokens >= max_model_len or (max_tokens is not None
                                          and prompt_tokens + max_tokens > max_model_len):
        raise context_length_error(max_model_len, prompt_tokens, max_tokens)


def from_exception(e: BaseException) -> APIError:
    """Map what the engine front raises onto an APIError."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return bad_request(str(e))
    if isinstance(e, QueueFullError):
        return APIError(503, f"The server is overloaded: {e}. Retry later.", type="server_error",
                        code="queue_full", grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    if isinstance(e, EngineUnavailableError):
        return APIError(503, f"Service unavailable: {e}", type="server_error", code="unavailable")
    if isinstance(e, EngineError):
        return APIError(500, str(e), type="server_error", code="engine_error")
    return APIError(500, f"Internal error: {type(e).__name__}: {e}", type="server_error",
                    code="internal_error")
