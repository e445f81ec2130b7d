"""Turns a scheduled step into one ragged batch and runs the jitted model and sampler.

Shapes are padded to a few token buckets (sequences padded to min(bucket, max_num_seqs)),
all compiled at start-up; afterwards a guard turns any compilation during a step into an
error, since one would stall every request for seconds.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from atom_jax.exported import exported_jit
from atom_jax.sampler import SAMPLING_MODES, sample, sampling_mode
from atom_jax.scheduler import ScheduledBatch
from kernels_pallas.ragged_paged_attention import SCALE_DTYPE, ScaledCache

_BANNED_SLOTS = 16  # per-row token ids masked while a request is below min_tokens
# Multi-step decode is kept (when chosen automatically) if queueing a step takes the host
# at least this fraction of the device's time for it: with the engine's own work per step
# added, the host then sets the pace of small batches. (H200: Llama-3.1-8B shape 1.6 ms
# against 3.6, off; Qwen3-0.6B shape on.)
HOST_BOUND_FRACTION = 0.8


def grows_on_demand(stats: dict) -> bool:
    """Whether JAX's GPU allocator takes memory from the device as needed
    (XLA_PYTHON_CLIENT_PREALLOCATE=false) rather than all of it at start, from memory_stats()."""
    return "pool_bytes" in stats and stats["pool_bytes"] < stats.get("bytes_limit", 0)


def allocate_kv_cache(num_layers: int, shape: tuple, dtype, stacked: bool = False,
                      scaled: bool = False):
    """Zeroed (K, V) arrays of every layer: a list of pairs, or with stacked one (K, V) pair
    over all layers, [num_layers, *shape] (the decode kernel's cache). With scaled, each is
    a ScaledCache (float8 rows and a scale per token and KV head). An allocator growing
    on demand would take a region per array, each rounded up to a power of two, and run out
    with the leftovers unusable; so there the whole cache is first taken as one array and
    given back, and its arrays then come from that one free block."""
    if grows_on_demand(jax.devices()[0].memory_stats() or {}):
        whole = jnp.zeros(num_layers * kv_cache_bytes_per_layer(shape, dtype, scaled),
                          jnp.uint8)
        whole.block_until_ready()
        whole.delete()
    if stacked:
        return tuple(jnp.zeros((num_layers, *shape), dtype) for _ in range(2))
    if scaled:
        return [tuple(_scaled_cache(shape, dtype) for _ in range(2)) for _ in range(num_layers)]
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def kv_cache_bytes_per_layer(shape: tuple, dtype, scaled: bool = False) -> int:
    """Bytes of one layer's K and V caches of `shape`, with scaled a ScaledCache's scales
    included (one SCALE_DTYPE per token and KV head)."""
    num_pages, page_size, num_kv_heads, head_dim = shape
    scale_bytes = jnp.dtype(SCALE_DTYPE).itemsize if scaled else 0
    row = head_dim * jnp.dtype(dtype).itemsize + scale_bytes
    return 2 * num_pages * page_size * num_kv_heads * row


def _scaled_cache(shape, dtype) -> ScaledCache:
    num_pages, page_size, num_kv_heads, _ = shape
    return ScaledCache(jnp.zeros(shape, dtype),
                       jnp.zeros((num_pages, num_kv_heads, page_size), SCALE_DTYPE))


class CompileWhileServingError(RuntimeError):
    pass


class _CompileGuard:
    """Counts XLA compilations that happen on this thread while armed."""

    _EVENT = "/jax/core/compile/backend_compile_duration"
    _local = threading.local()
    _registered = False

    @classmethod
    def _listener(cls, event, duration, **kwargs):
        if event == cls._EVENT and getattr(cls._local, "armed", False):
            cls._local.compiled.append(str(kwargs.get("fun_name", "?")))

    def __init__(self):
        if not _CompileGuard._registered:
            jax.monitoring.register_event_duration_secs_listener(_CompileGuard._listener)
            _CompileGuard._registered = True

    def __enter__(self):
        self._local.armed, self._local.compiled = True, []

    def __exit__(self, *exc):
        self._local.armed = False
        if exc[0] is None and self._local.compiled:
            raise CompileWhileServingError(
                f"{len(self._local.compiled)} XLA compilation(s) during a serving step "
                f"({', '.join(self._local.compiled)}): a shape escaped the start-up buckets")


def token_buckets(max_tokens: int, smallest: int = 4, also: tuple[int, ...] = ()) -> list[int]:
    """Powers of two from `smallest` up to max_tokens, max_tokens itself, and each of `also`
    in between (max_num_seqs, so that a full decode batch runs unpadded)."""
    buckets, b = [], min(smallest, max_tokens)
    while b < max_tokens:
        buckets.append(b)
        b *= 2
    extra = [a for a in also if buckets and buckets[0] < a < max_tokens]
    return sorted(set(buckets + extra + [max_tokens]))


def pack_host_arrays(arrays: dict) -> tuple[np.ndarray, tuple]:
    """Many small host arrays of 4-byte dtypes -> one int32 buffer and its layout (static,
    hashable). A step's inputs then reach the device in one transfer: passing each array
    to the jitted step cost 20-50 us of host time apiece on the H200."""
    layout = tuple((name, a.shape, a.dtype.str) for name, a in arrays.items())
    if any(a.dtype.itemsize != 4 for a in arrays.values()):
        raise TypeError(f"pack_host_arrays: 4-byte dtypes only, got {layout}")
    flat = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.int32)
                           for a in arrays.values()])
    return flat, layout


def unpack_arrays(flat, layout) -> dict:
    """Inverse of pack_host_arrays, inside a jitted function."""
    out, offset = {}, 0
    for name, shape, dtype in layout:
        size = math.prod(shape)
        a = flat[offset:offset + size].reshape(shape)
        out[name] = a if np.dtype(dtype) == np.int32 else jax.lax.bitcast_convert_type(a, np.dtype(dtype))
        offset += size
    return out


def _step_batch(packed, layout, last_tokens) -> dict:
    batch = unpack_arrays(packed, layout)
    # A token sampled by the step still in flight is read from that step's output on device.
    src = batch.pop("prev_index")
    batch["input_ids"] = jnp.where(src >= 0, last_tokens[jnp.maximum(src, 0)], batch["input_ids"])
    return batch


def _forward_step(module, cfg, attn_impl, layout, params, kv_cache, packed, last_tokens):
    return module.forward(params, kv_cache, _step_batch(packed, layout, last_tokens), cfg,
                          attn_impl)


_forward_jit = jax.jit(_forward_step, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))


@dataclasses.dataclass
class DecodeKernel:
    """Batch-1 decode steps with every layer in one persistent kernel (the model module's
    forward_decode_kernel): its weights, the GPU's multiprocessor count, and the longest
    context (tokens) it attends over; longer ones take the usual step."""
    weights: dict
    num_sms: int
    max_context: int


def _decode_kernel_step(module, cfg, num_sms, layout, params, weights, kv_cache, packed,
                        last_tokens):
    return module.forward_decode_kernel(params, weights, kv_cache,
                                        _step_batch(packed, layout, last_tokens), cfg, num_sms)


def _sample_step(logits, packed, layout, history, with_logprobs, mode, num_rows):
    # history (penalties only) stays an array of its own: one large transfer, no host copy
    return sample(logits, unpack_arrays(packed, layout), history, with_logprobs=with_logprobs,
                  mode=mode, num_rows=num_rows)


_sample_jit = jax.jit(_sample_step, static_argnames=("layout", "with_logprobs", "mode", "num_rows"))


def _decode_steps(module, cfg, attn_impl, layout, sp_layout, mode, num_steps, block_size,
                  params, kv_cache, packed, sp_packed, last_tokens):
    """num_steps decode steps of one batch in one program, each step's sampled tokens fed
    to the next on the device. Only for decode-only batches whose bucket has one row per
    token (token i is sequence i). Returns (kv_cache, tokens [num_steps, rows], last row)."""
    batch = unpack_arrays(packed, layout)
    sp = unpack_arrays(sp_packed, sp_layout)
    src = batch.pop("prev_index")
    ids = jnp.where(src >= 0, last_tokens[jnp.maximum(src, 0)], batch["input_ids"])
    live = batch["seq_lens"] > 0  # padding rows keep their no-op slot and empty context
    rows = jnp.arange(ids.shape[0])
    num_rows = last_tokens.shape[0]

    def step(j, carry):
        kv, ids, tokens = carry
        pos = batch["positions"] + j
        slots = batch["block_tables"][rows, pos // block_size] * block_size + pos % block_size
        step_batch = dict(batch, input_ids=ids, positions=pos,
                          seq_lens=jnp.where(live, batch["seq_lens"] + j, 0),
                          slot_mapping=jnp.where(live, slots, batch["slot_mapping"]))
        kv, logits = module.forward(params, kv, step_batch, cfg, attn_impl)
        (new,) = sample(logits, dict(sp, step=sp["step"] + j), None, with_logprobs=False,
                        mode=mode, num_rows=num_rows)
        return kv, new[:ids.shape[0]], tokens.at[j].set(new)

    # Unrolled: as a lax.fori_loop the device idled about 115 us between steps on the
    # H200 (Llama-3.1-8B shape, batch 1: 235.5 tok/s against 241.6 for single steps).
    carry = (kv_cache, ids, jnp.zeros((num_steps, num_rows), jnp.int32))
    for j in range(num_steps):
        carry = step(j, carry)
    kv_cache, _, tokens = carry
    return kv_cache, tokens, tokens[-1]


DECODE_STEPS_JIT_ARGS = dict(static_argnums=tuple(range(8)), donate_argnums=(9,))

# XLA's rematerialization pass counts the K/V cache of every unrolled step as a buffer of
# its own (the attention kernel updates it in place), estimates about twice the cache, more
# than is free, and recomputes kernels to save memory the program never needs: on the H200
# it added about 25 GEMM launches per token to the Qwen3-0.6B shape's 4-step program.
_decode_steps_jit = jax.jit(_decode_steps, **DECODE_STEPS_JIT_ARGS,
                            compiler_options={"xla_disable_hlo_passes": "rematerialization"})


MULTI_STEP_MODES = ("sample", "filter")


def multi_step_mode(mode: str) -> str:
    """The sampler variant of a multi-step launch (MULTI_STEP_MODES): "sample" serves greedy
    rows too (argmax where the temperature is 0), so each bucket needs two programs, not three."""
    return "filter" if mode == "filter" else "sample"


class LaunchedStep:
    """A step queued on the device: its outputs are fetched only when needed."""

    def __init__(self, batch: ScheduledBatch, outputs, with_logprobs: bool):
        self.batch, self.outputs, self.with_logprobs = batch, outputs, with_logprobs

    def fetch(self):
        """-> (tokens [steps, sequences], token logprobs, top ids, top logprobs) as numpy,
        logprobs one row per sequence (waits for the device)."""
        n = len(self.batch)
        tokens = np.asarray(self.outputs[0]).reshape(self.batch.num_steps, -1)[:, :n]
        if not self.with_logprobs:
            return tokens, None, None, None
        return (tokens, *(np.asarray(x)[:n] for x in self.outputs[1:]))


class ModelRunner:
    def __init__(self, module, model_config, params, *, dtype, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 attn_impl: str = "auto", eos_token_ids=(), num_scheduler_steps: int = 1,
                 multi_step_max_seqs: int = 0, multi_step_auto: bool = False,
                 decode_kernel: DecodeKernel | None = None, kv_cache_dtype=None,
                 kv_cache_scaled: bool = False):
        """kv_cache_dtype: the K/V cache's dtype; None: the model's (dtype).
        kv_cache_scaled: a float8 cache with a scale per token and KV head (ScaledCache)."""
        # With the decode kernel, its step is a jax.export module (see _decode_kernel_program),
        # whose outputs are committed to the device. A committed input makes another program
        # to XLA, so there every array the programs take is committed (no copy is made), and
        # each program sees the same inputs after either kind of step.
        self.device = jax.devices()[0] if decode_kernel else None
        if decode_kernel:
            params = self._commit(params)
            decode_kernel = dataclasses.replace(decode_kernel,
                                                weights=self._commit(decode_kernel.weights))
        self.module, self.model_config, self.params = module, model_config, params
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.attn_impl = attn_impl
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.buckets = token_buckets(max_num_batched_tokens, also=(max_num_seqs,))
        # Buckets that also get a program running num_scheduler_steps decode steps per
        # launch: small decode batches, where queueing a step costs the host more than the
        # step costs the device. Their bucket must give every token a sequence row.
        # multi_step_auto: warmup() keeps them only where the host is the bottleneck.
        self.num_scheduler_steps = num_scheduler_steps
        self.multi_step_buckets = [] if num_scheduler_steps < 2 else [
            b for b in self.buckets if b <= min(multi_step_max_seqs, max_num_seqs)]
        self.multi_step_auto = multi_step_auto
        self.multi_step_timing = None  # what the automatic choice measured
        self.decode_kernel = decode_kernel
        self.decode_kernel_steps = 0  # steps it ran
        self._decode_kernel_programs = {}  # its jitted step per input layout
        shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
        kv_dtype = kv_cache_dtype or dtype
        if decode_kernel:   # which reaches every layer's cache in one array
            self.kv_cache = self._commit(
                allocate_kv_cache(model_config.num_layers, shape, kv_dtype, stacked=True))
        else:
            self.kv_cache = allocate_kv_cache(model_config.num_layers, shape, kv_dtype,
                                              scaled=kv_cache_scaled)
        # The last launched step's sampled tokens (padded to max_num_seqs rows) and the row
        # of each sequence in it, so the next step can start before they reach the host.
        self.last_tokens = self._commit(jnp.zeros(max_num_seqs, jnp.int32))
        self.last_rows: dict[str, int] = {}
        self.guard = None  # armed by warmup()

    def _commit(self, tree):
        """tree's arrays committed to self.device (the same buffers), or tree as it is."""
        return tree if self.device is None else jax.device_put(tree, self.device, may_alias=True)

    # ------------------------------------------------------------ batch preparation

    def _bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def prepare(self, batch: ScheduledBatch):
        """The ragged batch as numpy arrays, vectorized over sequences (this runs every step)."""
        num_seqs, num_tokens = len(batch), batch.num_tokens
        inputs = self._padded_inputs(self._bucket(num_tokens))
        qsl, tables = inputs["query_start_loc"], inputs["block_tables"]
        counts = np.asarray(batch.num_new_tokens, np.int32)
        starts = np.fromiter((s.num_computed_tokens for s in batch.seqs), np.int32, num_seqs)
        qsl[1:num_seqs + 1] = np.cumsum(counts)
        qsl[num_seqs + 1:] = num_tokens
        inputs["seq_lens"][:num_seqs] = starts + counts
        for i, seq in enumerate(batch.seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
        inputs["input_ids"][:num_tokens] = np.fromiter(itertools.chain.from_iterable(
            seq.token_ids[st:st + n] for seq, st, n in zip(batch.seqs, starts.tolist(),
                                                          batch.num_new_tokens)),
            np.int32, num_tokens)
        row = np.repeat(np.arange(num_seqs), counts)
        pos = np.arange(num_tokens, dtype=np.int32) - qsl[row] + starts[row]
        inputs["positions"][:num_tokens] = pos
        ids = inputs["input_ids"][:num_tokens]
        if (ids < 0).any():  # placeholders: tokens of the step in flight, by their row there
            src = np.array([self.last_rows.get(seq.seq_id, -1) for seq in batch.seqs], np.int32)
            waiting = ids < 0
            inputs["prev_index"][:num_tokens] = np.where(waiting, src[row], -1)
            if (inputs["prev_index"][:num_tokens][waiting] < 0).any():
                raise RuntimeError("a placeholder token is not from the step in flight")
            ids[waiting] = 0
        bs = self.block_size
        inputs["slot_mapping"][:num_tokens] = tables[row, pos // bs] * bs + pos % bs
        inputs["logits_indices"] = np.maximum(qsl[1:] - 1, 0)
        return inputs

    def prepare_sampling(self, batch: ScheduledBatch, s_pad: int, with_penalties: bool | None = None):
        """Per-row sampling arrays (padded rows are greedy), plus the token history when any
        request uses penalties (or when with_penalties says so)."""
        seqs, n = batch.seqs, len(batch)

        def column(values, dtype, pad):
            out = np.full(s_pad, pad, dtype)
            out[:n] = np.fromiter(values, dtype, n)
            return out

        params = [seq.params for seq in seqs]
        vocab = self.model_config.vocab_size
        sp = dict(temperature=column((p.temperature for p in params), np.float32, 0),
                  top_k=column((min(max(p.top_k, 0), vocab) for p in params), np.int32, 0),
                  top_p=column((p.top_p for p in params), np.float32, 1),
                  min_p=column((p.min_p for p in params), np.float32, 0),
                  seed=column((seq.seed for seq in seqs), np.uint32, 0),
                  step=column((seq.num_output_tokens for seq in seqs), np.int32, 0),
                  banned=np.full((s_pad, _BANNED_SLOTS), -1, np.int32))
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                p = seq.params
                banned = (list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids)))
                sp["banned"][i, :len(banned[:_BANNED_SLOTS])] = banned[:_BANNED_SLOTS]
        history = None
        if with_penalties is None:
            with_penalties = any(p.uses_penalties for p in params)
        if with_penalties:
            history = np.full((s_pad, self.max_model_len), -1, np.int32)
            for i, seq in enumerate(seqs):
                history[i, :seq.num_tokens] = seq.token_ids
            sp.update(prompt_lens=column((seq.num_prompt_tokens for seq in seqs), np.int32, 0),
                      repetition=column((p.repetition_penalty for p in params), np.float32, 1),
                      presence=column((p.presence_penalty for p in params), np.float32, 0),
                      frequency=column((p.frequency_penalty for p in params), np.float32, 0))
        return sp, history

    # ------------------------------------------------------------ execution

    def run(self, inputs, sp, history, with_logprobs: bool = False, mode: str = "filter",
            kernel: bool = False):
        """Queue the model (with kernel, the decode kernel's step) and the sampler; returns
        device arrays (tokens padded to max_num_seqs rows first)."""
        packed, layout = pack_host_arrays(inputs)
        if kernel:
            self.kv_cache, logits = self._decode_kernel_program(layout)(
                *self._decode_kernel_args(packed))
        else:
            self.kv_cache, logits = _forward_jit(self.module, self.model_config, self.attn_impl,
                                                 layout, self.params, self.kv_cache, packed,
                                                 self.last_tokens)
        packed, layout = pack_host_arrays(sp)
        out = _sample_jit(logits, packed, layout, history, with_logprobs=with_logprobs, mode=mode,
                          num_rows=self.max_num_seqs)
        self.last_tokens = out[0]
        return out

    def _decode_kernel_args(self, packed) -> tuple:
        return self.params, self.decode_kernel.weights, self.kv_cache, packed, self.last_tokens

    def _decode_kernel_program(self, layout):
        """The decode kernel's step for this input layout, jitted. Its traced and lowered
        form is kept on disk beside the compilation cache (atom_jax/exported.py): tracing
        and lowering the kernel takes seconds that a warm start would otherwise spend."""
        if layout not in self._decode_kernel_programs:
            cache = jax.config.jax_compilation_cache_dir
            static = (self.module, self.model_config, self.decode_kernel.num_sms, layout)
            packed = jax.ShapeDtypeStruct((sum(math.prod(s) for _, s, _ in layout),), jnp.int32)
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                  self._decode_kernel_args(packed))
            self._decode_kernel_programs[layout] = exported_jit(
                _decode_kernel_step, static, shapes, donate_argnums=(2,),
                cache_dir=cache and os.path.join(cache, "atom-jax-exports"))
        return self._decode_kernel_programs[layout]

    def _lower_decode_kernel(self, packed, layout):
        return self._decode_kernel_program(layout).lower(*self._decode_kernel_args(packed))

    def uses_decode_kernel(self, batch: ScheduledBatch) -> bool:
        """A single sequence decoding one token, within the kernel's context."""
        return (self.decode_kernel is not None and batch.num_steps == 1 and len(batch) == 1
                and batch.num_new_tokens[0] == 1
                and batch.seqs[0].num_computed_tokens < self.decode_kernel.max_context)

    def _decode_steps_args(self, inputs, sp, num_steps: int, mode: str) -> tuple:
        """The arguments of _decode_steps for a batch's host arrays."""
        packed, layout = pack_host_arrays(inputs)
        sp_packed, sp_layout = pack_host_arrays(sp)
        return (self.module, self.model_config, self.attn_impl, layout, sp_layout,
                multi_step_mode(mode), num_steps, self.block_size,
                self.params, self.kv_cache, packed, sp_packed, self.last_tokens)

    def run_steps(self, inputs, sp, num_steps: int, mode: str):
        """Queue num_steps decode steps of a decode-only batch (see _decode_steps)."""
        self.kv_cache, tokens, self.last_tokens = _decode_steps_jit(
            *self._decode_steps_args(inputs, sp, num_steps, mode))
        return (tokens,)

    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Prepare and queue one step without waiting for it."""
        inputs = self.prepare(batch)
        sp, history = self.prepare_sampling(batch, len(inputs["seq_lens"]))
        with_logprobs = any(seq.params.logprobs is not None for seq in batch.seqs)
        mode = sampling_mode([seq.params for seq in batch.seqs], history is not None)
        with self.guard or contextlib.nullcontext():
            if batch.num_steps > 1:
                out = self.run_steps(inputs, sp, batch.num_steps, mode)
            else:
                kernel = self.uses_decode_kernel(batch)
                self.decode_kernel_steps += kernel
                out = self.run(inputs, sp, history, with_logprobs, mode, kernel)
        self.last_rows = {seq.seq_id: i for i, seq in enumerate(batch.seqs)}
        return LaunchedStep(batch, out, with_logprobs)

    def warmup(self, threads: int = 1) -> None:
        """Compile every bucket (the model, and the sampler per row count: each sampling
        mode, penalties, with and without logprobs) on `threads` threads, then run each
        bucket once with the guard armed, which proves nothing is left to compile. Then the
        multi-step programs, unless multi_step_auto finds the host keeping up with the
        device anyway (they would only cost start-up time)."""
        jobs = []  # each lowers one program
        for t in self.buckets:
            packed, layout = pack_host_arrays(self._padded_inputs(t))
            jobs.append(functools.partial(
                _forward_jit.lower, self.module, self.model_config, self.attn_impl, layout,
                self.params, self.kv_cache, packed, self.last_tokens))
        if self.decode_kernel:   # the smallest bucket, which a one-token step takes
            packed, layout = pack_host_arrays(self._padded_inputs(self.buckets[0]))
            jobs.append(functools.partial(self._lower_decode_kernel, packed, layout))
        # committed where the logits will be (see __init__)
        logits_sharding = (None if self.device is None
                           else jax.sharding.SingleDeviceSharding(self.device))
        for s_pad in sorted({min(t, self.max_num_seqs) for t in self.buckets}):
            # the sampler compiles from the logits' shape alone
            logits = jax.ShapeDtypeStruct((s_pad, self.model_config.vocab_size), jnp.float32,
                                          sharding=logits_sharding)
            variants = [(False, mode) for mode in SAMPLING_MODES] + [(True, "filter")]
            for with_penalties, mode in variants:
                sp, history = self.prepare_sampling(ScheduledBatch([], []), s_pad, with_penalties)
                packed, layout = pack_host_arrays(sp)
                for with_logprobs in (False, True):
                    jobs.append(functools.partial(
                        _sample_jit.lower, logits, packed, layout, history,
                        with_logprobs=with_logprobs, mode=mode, num_rows=self.max_num_seqs))
        self._compile(jobs, threads, f"Compiling {len(self.buckets)} shape buckets")
        self.guard = _CompileGuard()
        for t in self.buckets:
            inputs, sp = self._padding_batch(t)
            with self.guard:
                self.run(inputs, sp, None, mode="greedy")[0].block_until_ready()
        if self.decode_kernel:
            # (an all-padding step: it writes K/V rows into block 0, which holds nothing yet)
            inputs, sp = self._padding_batch(self.buckets[0])
            with self.guard:
                self.run(inputs, sp, None, mode="greedy", kernel=True)[0].block_until_ready()

        if self.multi_step_buckets and self.multi_step_auto:
            host, device = self.time_smallest_step()
            self.multi_step_timing = {"host_ms": host * 1e3, "device_ms": device * 1e3}
            if host < HOST_BOUND_FRACTION * device:
                self.multi_step_buckets = []
        jobs = [functools.partial(_decode_steps_jit.lower, *self.multi_step_args(t, mode))
                for t in self.multi_step_buckets for mode in MULTI_STEP_MODES]
        if jobs:
            self._compile(jobs, threads, f"Compiling {self.num_scheduler_steps}-step decode")
        for t in self.multi_step_buckets:
            inputs, sp = self._padding_batch(t)
            for mode in MULTI_STEP_MODES:
                with self.guard:
                    self.run_steps(inputs, sp, self.num_scheduler_steps, mode)[0].block_until_ready()

    def multi_step_args(self, t_pad: int, mode: str) -> tuple:
        """The arguments of _decode_steps for an all-padding batch of t_pad sequences."""
        return self._decode_steps_args(*self._padding_batch(t_pad), self.num_scheduler_steps,
                                       mode)

    def _padding_batch(self, t_pad: int) -> tuple[dict, dict]:
        """An all-padding batch of t_pad tokens and its sampling arrays (greedy rows, no
        penalties): what warm-up and the start-up timing run."""
        inputs = self._padded_inputs(t_pad)
        sp, _ = self.prepare_sampling(ScheduledBatch([], []), len(inputs["seq_lens"]), False)
        return inputs, sp

    @staticmethod
    def _compile(jobs, threads: int, desc: str) -> None:
        bar = tqdm(total=len(jobs), desc=desc, unit="program")
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            for future in concurrent.futures.as_completed(
                    [pool.submit(lambda lower: lower().compile(), job) for job in jobs]):
                future.result()
                bar.update()
        bar.close()

    def time_smallest_step(self, repeats: int = 7) -> tuple[float, float]:
        """(host seconds to queue, device seconds to run) one step of the smallest bucket,
        medians of `repeats` unpipelined runs: the host part is what a multi-step launch
        saves per step."""
        inputs, sp = self._padding_batch(self.buckets[0])
        queued, done = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with self.guard:
                out = self.run(inputs, sp, None, mode="greedy")[0]
            t1 = time.perf_counter()
            out.block_until_ready()
            queued.append(t1 - t0)
            done.append(time.perf_counter() - t0)
        host = float(np.median(queued))
        return host, max(float(np.median(done)) - host, 0.0)

    def _padded_inputs(self, t_pad: int):
        """An all-padding batch of exactly t_pad tokens (writes nothing to the cache)."""
        s_pad = min(t_pad, self.max_num_seqs)
        return dict(input_ids=np.zeros(t_pad, np.int32), positions=np.zeros(t_pad, np.int32),
                    slot_mapping=np.full(t_pad, self.num_blocks * self.block_size, np.int32),
                    query_start_loc=np.zeros(s_pad + 1, np.int32),
                    seq_lens=np.zeros(s_pad, np.int32),
                    block_tables=np.zeros((s_pad, self.max_blocks_per_seq), np.int32),
                    logits_indices=np.zeros(s_pad, np.int32),
                    prev_index=np.full(t_pad, -1, np.int32))
