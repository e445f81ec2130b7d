"""Paged KV blocks: allocation, chained-hash prefix caching, reference counts, LRU eviction,
and the scheduler's preemption when blocks run out (pure Python, no model)."""
from atom_jax.block_manager import BlockManager
from atom_jax.sampling_params import SamplingParams
from atom_jax.scheduler import Scheduler
from atom_jax.sequence import Sequence


def seq(tokens, name="s", max_tokens=8):
    return Sequence(name, tokens, SamplingParams(max_tokens=max_tokens), seed=0,
                    max_tokens=max_tokens)


def run_prefill(bm, s):
    cached = bm.find_cached_prefix(s)
    s.num_computed_tokens = len(cached) * bm.block_size
    bm.allocate(s, s.num_tokens - s.num_computed_tokens, cached)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)
    return len(cached)


def test_shared_prefix_is_found_and_reference_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)), "a")  # 2 full blocks + 2 tokens
    assert run_prefill(bm, a) == 0
    b = seq(list(range(8)) + [99, 98, 97], "b")
    assert run_prefill(bm, b) == 2  # both full blocks of the shared 8-token prefix
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_prefix_match_needs_the_whole_chain():
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    # same second block, different first block: the chained hash must not match
    assert run_prefill(bm, seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")) == 0


def test_last_token_is_always_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, seq(list(range(8)), "a"))
    again = seq(list(range(8)), "b")
    assert run_prefill(bm, again) == 1  # 8 tokens cached would leave nothing to run


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(9)), "a")  # 3 blocks, 2 of them full
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(list(range(9)), "b")
    assert run_prefill(bm, b) == 2  # still cached after being freed
    bm.free(b)
    c = seq([50 + i for i in range(13)], "c")  # needs all 4 blocks: evicts the cached ones
    run_prefill(bm, c)
    bm.free(c)
    assert run_prefill(bm, seq(list(range(9)), "d")) == 0


def complete(sched, batch, tokens):
    """Launch-and-collect a step: advance, then resolve each placeholder with its token."""
    for row, s, index, _ in sched.advance(batch):
        sched.resolve(s, index, tokens[row])


def test_scheduler_preempts_when_blocks_run_out_and_mixes_prefill_with_decode():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a, b = seq(list(range(10)), "a"), seq(list(range(100, 110)), "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [10, 6]  # b's prefill is chunked
    complete(sched, batch, [1, 2])
    assert a.num_tokens == 11 and b.num_tokens == 10  # only a finished its prompt
    batch = sched.schedule()
    assert batch.num_new_tokens == [1, 4]  # a decodes while b's prefill continues
    complete(sched, batch, [3, 4])
    # a needs a 4th block for token 13..; 6 blocks: a has 3, b has 3 -> someone is preempted
    for _ in range(3):
        batch = sched.schedule()
        complete(sched, batch, [5] * len(batch))
    assert sched.num_preemptions >= 1
    assert bm.num_free_blocks + sum(len(s.block_table) for s in sched.running) == 6


def test_a_cached_prefix_is_not_counted_twice_when_the_pool_is_nearly_full():
    # The whole pool holds one sequence's freed, still-cached prefix: readmitting it must
    # fit (cached blocks are reused, only the tail needs fresh ones).
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(15)), "a")  # 4 blocks, 3 of them full and cached
    run_prefill(bm, a)
    bm.free(a)
    again = seq(list(range(15)), "again")
    cached = bm.find_cached_prefix(again)
    assert len(cached) == 3
    again.num_computed_tokens = 12
    assert bm.can_allocate(again, 3, cached)
    bm.allocate(again, 3, cached)
    assert len(again.block_table) == 4 and bm.num_free_blocks == 0


def test_steps_in_flight_leave_placeholders_that_are_never_hashed_or_kept():
    from atom_jax.sequence import PLACEHOLDER
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a = seq(list(range(7)), "a")
    sched.add(a)
    first = sched.schedule()
    produced = sched.advance(first)  # launched, tokens not yet known
    assert produced == [(0, a, 7, 0)]
    assert a.token_ids[-1] == PLACEHOLDER and a.num_pending == 1
    second = sched.schedule()  # scheduled behind the first: decodes the placeholder
    assert second.seqs == [a] and second.num_new_tokens == [1]
    second_produced = sched.advance(second)
    assert a.num_pending == 2 and a.num_computed_tokens == 8
    bm.register_full_blocks(a)
    assert len(a.block_hashes) == 1  # tokens 4..7 hold a placeholder: not findable yet
    sched.resolve(a, 7, 42)
    assert len(a.block_hashes) == 2  # now known; token 8 (next block) is still in flight
    sched.finish(a, "stop")  # it stopped at token 7: the in-flight token 8 is dropped
    assert a.token_ids == list(range(7)) + [42] and a.num_pending == 0
    assert second_produced and a.is_finished and bm.num_free_blocks == 8


def test_a_sequence_awaiting_its_last_token_is_not_scheduled_again():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a = seq(list(range(5)), "a", max_tokens=1)
    sched.add(a)
    sched.advance(sched.schedule())
    assert a.awaiting_last_token
    assert not sched.schedule().seqs
