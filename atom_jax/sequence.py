"""A request's state as it moves through the scheduler."""
from __future__ import annotations

import enum
import time

from atom_jax.sampling_params import SamplingParams


PLACEHOLDER = -1  # a sampled token still on the device: the step that samples it is in flight


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, max_tokens: int):
        self.seq_id = seq_id
        self.request_id = seq_id  # the engine sets the owning request's id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed  # every request samples from its own stream, so batching never matters
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache (or being written)
        self.num_pending = 0  # trailing PLACEHOLDER tokens: sampled by steps not yet collected
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks registered so far
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.output_logprobs: list[dict] = []
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def awaiting_last_token(self) -> bool:
        """Its last token is already being sampled: nothing more to schedule."""
        return self.num_output_tokens >= self.max_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
