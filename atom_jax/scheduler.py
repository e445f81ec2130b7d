"""Continuous batching: each step, decodes and prefill chunks share one token budget.

Running sequences go first (a decode takes 1 token, an unfinished prefill the rest of its
prompt up to the budget); waiting sequences are admitted with what is left. When the KV pool
runs dry, the most recently admitted running sequence is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed (prefix caching usually gives most
of it back).
"""
from __future__ import annotations

import dataclasses
from collections import deque

from atom_jax.block_manager import BlockManager
from atom_jax.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_steps: int = 1  # decode steps in one launch (each sequence then has 1 new token)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_scheduler_steps: int = 1, multi_step_max_seqs: int = 0):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_scheduler_steps = num_scheduler_steps
        self.multi_step_max_seqs = multi_step_max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.awaiting_last_token:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.try_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1

        # Admit new work only when nothing had to be preempted this step.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = min(seq.num_tokens - num_cached, budget)
            seq.num_computed_tokens = num_cached
            if not bm.can_allocate(seq, n, cached):
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            bm.allocate(seq, n, cached)
            if bm.enable_prefix_caching:
                bm.prefix_queries += seq.num_tokens
                bm.prefix_hits += num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        if not preempted and self._can_run_steps(batch):
            batch.num_steps = self.num_scheduler_steps
        return batch

    def _can_run_steps(self, batch: ScheduledBatch) -> bool:
        """Whether the batch may run num_scheduler_steps decode steps in one launch: a small
        decode-only batch with nobody waiting (a newcomer would wait for the whole launch),
        every sequence short of max_tokens by at least that many tokens (the launch cannot
        stop early; tokens past a stop string or eos are dropped), sampling that needs no
        host work between steps, and KV blocks for every step."""
        k = self.num_scheduler_steps
        if k < 2 or self.waiting or not batch.seqs or len(batch) > self.multi_step_max_seqs:
            return False
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            p = seq.params
            if (n != 1 or seq.num_tokens - seq.num_computed_tokens != 1
                    or seq.num_output_tokens + k > seq.max_tokens
                    or seq.num_output_tokens < p.min_tokens
                    or p.uses_penalties or p.logprobs is not None):
                return False
        return all(self.block_manager.try_allocate(seq, k) for seq in batch.seqs)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, batch: ScheduledBatch) -> list[tuple[int, Sequence, int, int]]:
        """Account for a launched step before its tokens are known, so the next step can be
        scheduled behind it: every sequence that will sample a token gets a PLACEHOLDER.
        Returns (batch row, sequence, token index, step of the launch) for each of them (a
        prefill chunk that does not reach the end of the prompt samples nothing; a
        multi-step launch samples num_steps tokens per sequence)."""
        produced = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                # each later step of a multi-step launch computes the token sampled before it
                seq.num_computed_tokens += batch.num_steps - 1
                for step in range(batch.num_steps):
                    produced.append((row, seq, seq.num_tokens, step))
                    seq.token_ids.append(PLACEHOLDER)
                    seq.num_pending += 1
        return produced

    def resolve(self, seq: Sequence, index: int, token: int) -> None:
        """The token sampled for position `index` arrived from the device."""
        seq.token_ids[index] = token
        seq.num_pending -= 1
        self.block_manager.register_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence wherever it is (finished, stopped or aborted) and free its blocks."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        # Tokens of steps still in flight are dropped: the sequence ends where it stopped.
        del seq.token_ids[seq.num_known_tokens:]
        seq.num_pending = 0
