"""Paged KV blocks with prefix caching.

A full block is identified by a hash chained over every token before it, so two sequences
share a block only when their whole prefixes match. Blocks carry reference counts; a block
whose count drops to zero goes to the back of an LRU free queue but keeps its hash, so a
later request can still hit it until the block is handed out again.
"""
from __future__ import annotations

from collections import OrderedDict

from atom_jax.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # tokens of admitted requests looked up, for metrics
        self.prefix_hits = 0  # tokens of those found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _hash(self, parent: int | None, tokens) -> int:
        return hash((parent, tuple(tokens)))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding a prefix of seq. At least one token is left to compute, so
        the last prompt token always runs through the model and yields logits."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        blocks, parent = [], None
        for i in range((seq.num_tokens - 1) // bs):
            parent = self._hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = self.hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, num_cached_blocks: int = 0) -> int:
        """Fresh blocks for num_new_tokens more, once num_cached_blocks cached ones are added."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table) - num_cached_blocks)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        # Cached blocks sitting in the free queue stop being free once we take them.
        reclaimed = sum(1 for b in cached if self.ref_counts[b] == 0)
        needed = self.blocks_needed(seq, num_new_tokens, len(cached))
        return needed <= self.num_free_blocks - reclaimed

    def try_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Fresh blocks for a running sequence's next tokens, if the pool has them."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        if needed:
            self.allocate(seq, num_new_tokens)
        return True

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> None:
        """Give seq the cached prefix blocks (if any) and enough fresh blocks for its new tokens."""
        for b in cached:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(self.block_hash[b])
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            b, _ = self.free_queue.popitem(last=False)  # least recently used
            if self.block_hash[b] is not None:
                if self.hash_to_block.get(self.block_hash[b]) == b:
                    del self.hash_to_block[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            seq.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        # Reverse order: a sequence's tail blocks are evicted before its (more shareable) head.
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None
        seq.block_table = []
        seq.block_hashes = []

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the blocks that became full (K/V computed, every token known) findable by
        later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(min(seq.num_computed_tokens, seq.num_known_tokens) // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = self._hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if self.block_hash[b] is None and h not in self.hash_to_block:
                self.block_hash[b] = h
                self.hash_to_block[h] = b
