"""EngineCore (the step loop's state) and LLM (the offline API on top of it)."""
from __future__ import annotations

import itertools
import logging
import os
import random
import time

import jax
import jax.numpy as jnp

from atom_jax.block_manager import BlockManager
from atom_jax.config import EngineConfig
from atom_jax.loader import load_model
from atom_jax.model_runner import (DecodeKernel, ModelRunner, grows_on_demand,
                                   kv_cache_bytes_per_layer)
from atom_jax.output_processor import SequenceOutput
from atom_jax.outputs import CompletionOutput, RequestOutput, StepDelta
from atom_jax.sampling_params import SamplingParams
from atom_jax.scheduler import Scheduler
from atom_jax.sequence import Sequence
from atom_jax.tokenizer import check_token_ids, load_tokenizer
from kernels_pallas import decode_layers_mgpu
from models import get_model_module

try:  # private, with no public equivalent
    from jax._src.xla_bridge import backends_are_initialized
except ImportError:  # then the fraction is set regardless, and may come too late to apply
    def backends_are_initialized() -> bool:
        return False

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def claim_gpu_memory(fraction: float | None) -> None:
    """Set the share of GPU memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION).
    JAX reads it once, when its backends start, so this must run before anything touches a
    device. None keeps a fraction the environment sets, else takes the default."""
    env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    wanted = fraction if fraction is not None else (None if env else DEFAULT_GPU_MEMORY_UTILIZATION)
    if wanted is None or (env and float(env) == wanted):
        return
    if backends_are_initialized():
        if fraction is not None:  # asked for explicitly: say it did not happen
            logger.warning("gpu_memory_utilization=%s not applied: JAX's backends had already "
                           "started (set it before the process first uses JAX)", fraction)
        return
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(wanted)


def allocatable_bytes(stats: dict) -> int | None:
    """What JAX's GPU allocator can still hand out, from Device.memory_stats(); None where it
    reports no limit. Preallocated (the default), its one region less what is in use. Growing
    on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false), what it has not yet taken from the device,
    or its largest free block if larger: leftovers of its regions cannot merge with a new one,
    so the cache must fit in one block (see allocate_kv_cache)."""
    limit = stats.get("bytes_limit")
    if not limit:
        return None
    if not grows_on_demand(stats):
        return limit - stats.get("bytes_in_use", 0)
    return max(limit - stats["pool_bytes"], stats.get("largest_free_block_bytes", 0))


def decode_kernel_unsupported(module, cfg, dtype, block_size: int) -> str | None:
    """Why the persistent decode kernel cannot serve this model here (None when it can)."""
    device = jax.devices()[0]
    if device.platform != "gpu" or not str(getattr(device, "compute_capability", "")).startswith("9."):
        return "it needs an NVIDIA Hopper GPU (compute capability 9.x)"
    if not hasattr(module, "forward_decode_kernel"):
        return "it is not written for this model family"
    return decode_layers_mgpu.unsupported_reason(cfg, dtype, block_size, device.core_count)


def setup_decode_kernel(mode: str, module, cfg, params, dtype, block_size: int):
    """-> (params, cfg, DecodeKernel or None). mode auto | on | off (EngineConfig.decode_kernel);
    where the kernel is used, params and cfg move to its q/k order and its weights are made."""
    if mode == "off":
        return params, cfg, None
    reason = decode_kernel_unsupported(module, cfg, dtype, block_size)
    if reason is not None:
        if mode == "on":
            raise ValueError(f"decode_kernel: {reason}")
        return params, cfg, None
    if block_size < decode_layers_mgpu.TC:
        logger.info("decode kernel: %d-token pages take %d copies per %d-token split; "
                    "block_size %d is faster (docs/performance.md, The decode kernel)",
                    block_size, decode_layers_mgpu.TC // block_size, decode_layers_mgpu.TC,
                    decode_layers_mgpu.TC)
    decode_layers_mgpu.load_runtime()
    params, cfg = module.to_qk_halves(params, cfg)
    num_sms = jax.devices()[0].core_count
    weights = decode_layers_mgpu.prepare_weights(params["layers"])
    return params, cfg, DecodeKernel(weights, num_sms,
                                     decode_layers_mgpu.max_context(cfg, num_sms))


class _Request:
    def __init__(self, request_id, prompt, prompt_token_ids, params, seqs, outputs):
        self.request_id, self.prompt = request_id, prompt
        self.prompt_token_ids, self.params = prompt_token_ids, params
        self.seqs: list[Sequence] = seqs
        self.outputs: list[SequenceOutput] = outputs


class EngineCore:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(**kwargs)
        config.validate()
        self.config = config
        claim_gpu_memory(config.gpu_memory_utilization)
        if jax.config.jax_compilation_cache_dir is None:  # restarts reuse compiled buckets
            jax.config.update("jax_compilation_cache_dir",
                              os.environ.get("ATOM_JAX_CACHE_DIR",
                                             os.path.expanduser("~/.cache/atom-jax/xla")))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            # every program, the sub-second samplers too: a warm start compiles nothing
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        on_gpu = jax.default_backend() != "cpu"
        dtype = _DTYPES.get(config.dtype) or (jnp.bfloat16 if on_gpu else jnp.float32)
        self.dtype = dtype
        self.kv_cache_dtype = dtype if config.kv_cache_dtype == "auto" else jnp.float8_e4m3fn
        self.kv_cache_scaled = config.kv_cache_dtype == "fp8_per_token"

        self.startup_times: dict[str, float] = {}  # seconds per start-up phase, for logs and benchmarks
        t0 = time.perf_counter()
        model_config, params, kind, path, gguf_fields = load_model(config.model, dtype,
                                                                   config.load_format)
        kernel_mode = "off" if config.kv_cache_dtype != "auto" else config.decode_kernel
        params, model_config, decode_kernel = setup_decode_kernel(
            kernel_mode, get_model_module(model_config), model_config, params, dtype,
            config.block_size)
        jax.block_until_ready((params, decode_kernel and decode_kernel.weights))
        self.startup_times["load_s"] = time.perf_counter() - t0
        self.model_config = model_config
        self.tokenizer = load_tokenizer(kind, path, gguf_fields)
        eos = set(model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

        cap = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > cap:
            raise ValueError(f"max_model_len ({config.max_model_len}) is larger than the model's "
                             f"max_position_embeddings ({cap})")
        self.max_model_len = config.max_model_len or (cap if on_gpu else min(cap, 2048))
        max_num_seqs = config.max_num_seqs or (256 if on_gpu else 32)
        budget = config.max_num_batched_tokens or (8192 if on_gpu else 256)
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(on_gpu)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"num_kv_blocks: {num_blocks} blocks of {config.block_size} tokens cannot hold "
                f"one sequence of max_model_len={self.max_model_len}")

        t0 = time.perf_counter()
        # Multi-step decode: by default on GPU, where warm-up measures whether the host
        # is the bottleneck of small batches (it is for small models).
        steps = config.num_scheduler_steps or (4 if on_gpu else 1)
        self.runner = ModelRunner(
            get_model_module(model_config), model_config, params, dtype=dtype,
            num_blocks=num_blocks, block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
            attn_impl=config.attn_impl, eos_token_ids=self.eos_token_ids,
            num_scheduler_steps=steps, multi_step_max_seqs=config.multi_step_max_seqs,
            multi_step_auto=config.num_scheduler_steps is None, decode_kernel=decode_kernel,
            kv_cache_dtype=self.kv_cache_dtype, kv_cache_scaled=self.kv_cache_scaled)
        jax.block_until_ready(self.runner.kv_cache)
        self.startup_times["kv_cache_s"] = time.perf_counter() - t0
        if config.compile_at_startup:
            t0 = time.perf_counter()
            self.runner.warmup(config.compile_threads or (8 if on_gpu else 1))
            self.startup_times["compile_s"] = time.perf_counter() - t0
            if self.runner.multi_step_timing:
                logger.info("multi-step decode %s: queueing a step takes the host %.2f ms, "
                            "running it the device %.2f ms",
                            "on" if self.runner.multi_step_buckets else "off",
                            self.runner.multi_step_timing["host_ms"],
                            self.runner.multi_step_timing["device_ms"])
        # after warm-up, which may have dropped the multi-step programs
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, budget, steps,
                                   max(self.runner.multi_step_buckets, default=0))
        kv_tokens = num_blocks * config.block_size
        logger.info("start-up: %s; %d KV blocks of %d tokens (%s): %d tokens, %.1f sequences "
                    "of max_model_len %d at once",
                    ", ".join(f"{k} {v:.1f}" for k, v in self.startup_times.items()),
                    num_blocks, config.block_size, jnp.dtype(self.kv_cache_dtype).name
                    + (", a scale per token and KV head" if self.kv_cache_scaled else ""),
                    kv_tokens, kv_tokens / self.max_model_len,
                    self.max_model_len)
        self.requests: dict[str, _Request] = {}
        self._seq_to_request: dict[str, tuple[_Request, int]] = {}
        self._in_flight = None  # (LaunchedStep, what Scheduler.advance returned) of the last step
        self._seeds = random.Random(config.seed)
        self._ids = itertools.count()

    def _blocks_for_memory(self, on_gpu: bool) -> int:
        mc = self.model_config
        bytes_per_block = mc.num_layers * kv_cache_bytes_per_layer(
            (1, self.config.block_size, mc.num_kv_heads, mc.head_dim), self.kv_cache_dtype,
            self.kv_cache_scaled)
        if self.config.kv_cache_memory_gb is not None:
            budget = self.config.kv_cache_memory_gb * 2**30
        elif on_gpu:
            free = allocatable_bytes(jax.devices()[0].memory_stats() or {})
            if free is None:
                raise ValueError("cannot size the K/V cache: the GPU allocator reports no memory "
                                 "limit (XLA_PYTHON_CLIENT_ALLOCATOR=platform?); pass "
                                 "kv_cache_memory_gb")
            budget = 0.9 * free
        else:
            budget = 2**30
        return max(1, int(budget // bytes_per_block))

    # ------------------------------------------------------------ requests

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt that fits the context, or a ValueError naming what is wrong."""
        ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens do not fit: max_model_len is {self.max_model_len} "
                "and at least one token must be generated")
        return ids

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return check_token_ids(prompt, self.model_config.vocab_size, "prompt_token_ids")

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """Validate params against this model too (raises ValueError naming the field)."""
        params.validate()
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[:3]} are not token ids in [0, {vocab})")
        return params

    def stats(self) -> tuple[int, int]:
        """(requests with a sequence running, requests waiting with none running)."""
        running = {seq.request_id for seq in self.scheduler.running}
        waiting = {seq.request_id for seq in self.scheduler.waiting} - running
        return len(running), len(waiting)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None) -> str:
        """Validate and queue a request (nothing is queued if it is invalid).
        prompt_token_ids: ids already checked by tokenize_prompt(prompt)."""
        params = self.check_params(params or SamplingParams())
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenize_prompt(prompt)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        room = self.max_model_len - len(ids)
        max_tokens = min(params.max_tokens or room, room)
        seqs, outputs = [], []
        for i in range(params.n):
            # the sampler holds seeds in 32 bits; any integer seed is folded into that range
            seed = (params.seed + i) % 2**31 if params.seed is not None else self._seeds.getrandbits(31)
            seq = Sequence(f"{request_id}#{i}", ids, params, seed, max_tokens)
            seq.request_id = request_id
            seqs.append(seq)
            outputs.append(SequenceOutput(seq, self.tokenizer, self.eos_token_ids, self.max_model_len))
        req = _Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, seqs, outputs)
        self.requests[request_id] = req
        for i, seq in enumerate(seqs):
            self._seq_to_request[seq.seq_id] = (req, i)
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
            self._seq_to_request.pop(seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ------------------------------------------------------------ stepping

    def step(self) -> list[StepDelta]:
        """Queue the next step, then collect the one before it.

        The next step is scheduled and launched before the previous step's tokens reach the
        host (they are read on the device), so host work overlaps the device; the deltas
        returned are those of the previous step. A sequence that stops (eos, stop string) is
        thus computed one step too many, and that token is dropped."""
        if self._in_flight is not None and self._must_wait_for_tokens():
            deltas = self._collect()
        else:
            deltas = []
        batch = self.scheduler.schedule()
        launched = None
        if batch.seqs:
            launched = self.runner.launch(batch), self.scheduler.advance(batch)
        if self._in_flight is not None:
            deltas += self._collect()
        self._in_flight = launched
        return deltas

    def _must_wait_for_tokens(self) -> bool:
        # Penalties need every generated token on the host to build the token history.
        return any(seq.num_pending and seq.params.uses_penalties for seq in self.scheduler.running)

    def _collect(self) -> list[StepDelta]:
        launched, produced = self._in_flight
        self._in_flight = None
        tokens, token_lps, top_ids, top_lps = launched.fetch()
        deltas = []
        for row, seq, index, step in produced:
            if seq.is_finished:  # aborted or stopped while this step was in flight
                continue
            token = int(tokens[step, row])
            self.scheduler.resolve(seq, index, token)
            req, i = self._seq_to_request[seq.seq_id]
            lp = None
            if seq.params.logprobs is not None:
                lp = {token: float(token_lps[row])}
                for tid, val in list(zip(top_ids[row], top_lps[row]))[:seq.params.logprobs]:
                    lp.setdefault(int(tid), float(val))
                seq.output_logprobs.append(lp)
            text, reason, stop_reason = req.outputs[i].append(token, index)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                seq.stop_reason = stop_reason
            if step and deltas and deltas[-1].request_id == req.request_id and deltas[-1].index == i:
                # the later tokens of a multi-step launch extend the sequence's delta
                d = deltas[-1]
                d.new_token_ids.append(token)
                d.new_text += text
                d.finished, d.finish_reason, d.stop_reason = reason is not None, reason, stop_reason
                continue
            deltas.append(StepDelta(req.request_id, i, [token], text,
                                    [lp] if lp is not None else None, reason is not None,
                                    reason, stop_reason))
        return deltas

    def request_output(self, request_id: str) -> RequestOutput:
        req = self.requests[request_id]
        outs = []
        for i, (seq, out) in enumerate(zip(req.seqs, req.outputs)):
            lps = seq.output_logprobs if seq.params.logprobs is not None else None
            cum = sum(d[t] for d, t in zip(lps, seq.output_token_ids)) if lps else None
            outs.append(CompletionOutput(i, out.text, seq.output_token_ids, seq.finish_reason,
                                         seq.stop_reason, lps, cum))
        finished = all(seq.is_finished for seq in req.seqs)
        cached = max(0, min(seq.num_cached_tokens for seq in req.seqs))
        return RequestOutput(request_id, req.prompt, req.prompt_token_ids, outs, finished, cached)

    def release(self, request_id: str) -> None:
        """Forget a finished request."""
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else ():
            self._seq_to_request.pop(seq.seq_id, None)


class LLM:
    """Offline batch generation: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = EngineCore(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = EngineCore(config)
        llm.tokenizer = llm.engine.tokenizer
        return llm

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                              and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError("sampling_params: one per prompt, or a single one for all")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        for p in params:
            self.engine.check_params(p)
        ids = [self.engine.tokenize_prompt(p) for p in prompts]  # fail before queueing any
        rids = [self.engine.add_request(p, sp, prompt_token_ids=i)
                for p, sp, i in zip(prompts, params, ids)]
        try:
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        outputs = [self.engine.request_output(rid) for rid in rids]
        for rid in rids:
            self.engine.release(rid)
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of {role, content}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in convs]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, conversation) -> list[int]:
        out = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                 tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
