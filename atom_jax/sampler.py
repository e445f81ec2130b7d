"""Sampling on device: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Every row draws from its own key, fold_in(PRNGKey(seed), number of tokens generated so far),
so a request's samples do not depend on what else is in the batch or on preemption.
Logprobs are those of the model's raw distribution (before penalties and temperature).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from atom_jax.sampling_params import MAX_TOP_LOGPROBS


def apply_penalties(logits, history, prompt_lens, repetition, presence, frequency):
    """history [S, L]: prompt then output token ids, -1 padded. Repetition penalty covers
    prompt and output tokens (as Hugging Face and vLLM); presence/frequency only output."""
    s, v = logits.shape
    pos = jnp.arange(history.shape[1])[None, :]
    valid = history >= 0
    is_output = valid & (pos >= prompt_lens[:, None])
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], history.shape)
    ids = jnp.where(valid, history, v)  # out of range: dropped
    seen = jnp.zeros((s, v), jnp.bool_).at[rows, ids].set(True, mode="drop")
    counts = jnp.zeros((s, v), jnp.float32).at[rows, ids].add(is_output.astype(jnp.float32), mode="drop")
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def _filter_mask(x, top_k, top_p, min_p):
    """The tokens that top-k, top-p and min-p keep, in vocabulary order (x: logits over
    temperature). Sampling then happens in vocabulary order whether or not a row filters, so
    a seeded request draws the same token in any batch."""
    v = x.shape[-1]
    order = jnp.argsort(-x, axis=-1)
    sx = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    in_top_k = rank < jnp.where(top_k > 0, top_k, v)[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sx, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = in_top_k & (before < top_p[:, None]) & (probs >= min_p[:, None] * probs[:, :1])
    keep = keep.at[:, 0].set(True)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros_like(keep).at[rows, order].set(keep)


SAMPLING_MODES = ("greedy", "sample", "filter")


def sampling_mode(params_list, with_penalties: bool) -> str:
    """The cheapest sampler variant that serves every row: greedy (all temperatures 0),
    sample (temperature only: no sort over the vocabulary) or filter (top-k/top-p/min-p)."""
    sampled = [p for p in params_list if p.temperature > 0]
    if not sampled and not with_penalties:
        return "greedy"
    if with_penalties or any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in sampled):
        return "filter"
    return "sample"


def sample(logits, sp: dict, history=None, with_logprobs: bool = True, mode: str = "filter",
           num_rows: int | None = None):
    """logits [S, V] float32; sp: per-row arrays temperature, top_k, top_p, min_p, seed, step, banned [S, B],
    and (with history) repetition, presence, frequency, prompt_lens.
    Returns tokens [num_rows or S] (zero padded), their logprobs [S], top ids [S, K], top
    logprobs [S, K]; without with_logprobs only the tokens (the full-vocabulary top-k is skipped).
    mode (SAMPLING_MODES, chosen on the host by sampling_mode) is static rather than a
    lax.cond: a device-side branch makes the host wait for the model step, which would stop
    the next step from being queued behind it."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    # Tokens a request may not produce yet (eos and stop ids below min_tokens); -1 pads.
    s, v = logits.shape
    banned = jnp.where(sp["banned"] >= 0, sp["banned"], v)
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], banned.shape)
    logits = logits.at[rows, banned].set(-jnp.inf, mode="drop")
    if history is not None:
        logits = apply_penalties(logits, history, sp["prompt_lens"], sp["repetition"],
                                 sp["presence"], sp["frequency"])
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode != "greedy":
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(
            sp["seed"], sp["step"])
        x = logits / jnp.maximum(sp["temperature"], 1e-6)[:, None]
        if mode == "filter":
            x = jnp.where(_filter_mask(x, sp["top_k"], sp["top_p"], sp["min_p"]), x, -jnp.inf)
        sampled = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        tokens = jnp.where(sp["temperature"] == 0, tokens, sampled)
    padded = tokens if num_rows is None else jnp.zeros(num_rows, jnp.int32).at[:s].set(tokens)
    if not with_logprobs:
        return (padded,)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
    return padded, token_logprobs, top_ids.astype(jnp.int32), top_lp


sample_jit = jax.jit(sample, static_argnames=("with_logprobs", "mode", "num_rows"))
