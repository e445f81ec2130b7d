"""Acceptance 6: top-k, top-p and min-p restrict the sampled support; seeds reproduce."""
import numpy as np
import jax.numpy as jnp
import pytest

from atom_jax.sampler import apply_penalties, sample_jit

V = 64
ROWS = 512  # draws per check: every row samples the same distribution with its own key


def draws(logits_row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0):
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32), (ROWS, 1))
    sp = dict(temperature=jnp.full(ROWS, temperature, jnp.float32),
              top_k=jnp.full(ROWS, top_k, jnp.int32), top_p=jnp.full(ROWS, top_p, jnp.float32),
              min_p=jnp.full(ROWS, min_p, jnp.float32),
              seed=jnp.full(ROWS, seed, jnp.uint32), step=jnp.arange(ROWS, dtype=jnp.int32),
              banned=jnp.full((ROWS, 4), -1, jnp.int32))
    return np.asarray(sample_jit(logits, sp, None)[0])


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(0, 2.0, V).astype(np.float32)


def probs(logits):
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_unrestricted_sampling_covers_many_tokens(logits):
    assert len(set(draws(logits))) > 10


def test_top_k_restricts_support(logits):
    allowed = set(np.argsort(-logits)[:5])
    got = set(draws(logits, top_k=5))
    assert got <= allowed and len(got) >= 3


def test_top_p_restricts_support_to_the_nucleus(logits):
    order = np.argsort(-logits)
    cum = np.cumsum(probs(logits)[order])
    nucleus = set(order[:np.searchsorted(cum, 0.6) + 1])
    got = set(draws(logits, top_p=0.6))
    assert got <= nucleus and len(got) >= 2


def test_min_p_restricts_support(logits):
    p = probs(logits)
    allowed = set(np.nonzero(p >= 0.2 * p.max())[0])
    got = set(draws(logits, min_p=0.2))
    assert got <= allowed and len(got) >= 2


def test_sample_frequencies_follow_the_distribution(logits):
    p = probs(logits / 2.0)  # temperature 2
    counts = np.bincount(draws(logits, temperature=2.0), minlength=V)
    top = np.argsort(-p)[:3]
    # each of the three likeliest tokens lands within 5 standard deviations of its expectation
    sd = np.sqrt(ROWS * p[top] * (1 - p[top]))
    assert np.all(np.abs(counts[top] - ROWS * p[top]) < 5 * sd + 1)


def test_seeds_reproduce_and_differ(logits):
    a, b, c = draws(logits, seed=7), draws(logits, seed=7), draws(logits, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_greedy_rows_take_the_argmax(logits):
    assert set(draws(logits, temperature=0.0)) == {int(np.argmax(logits))}


def test_penalties():
    logits = jnp.array([[2.0, -1.0, 1.0, 0.5]])
    history = jnp.array([[0, 1, 2, 2, -1]])  # prompt: token 0; output: 1, 2, 2
    out = np.asarray(apply_penalties(logits, history, jnp.array([1]), jnp.array([2.0]),
                                     jnp.array([0.5]), jnp.array([0.25])))[0]
    # repetition divides positive / multiplies negative logits of every seen token;
    # presence (0.5) and frequency (0.25 per use) only hit output tokens
    np.testing.assert_allclose(out, [1.0, -2.0 - 0.5 - 0.25, 0.5 - 0.5 - 0.5, 0.5], rtol=1e-6)


def test_every_sampling_mode_draws_the_same_token_for_the_same_seed(logits):
    """A batch's mode depends on its other requests (one top-p request makes the whole
    batch filter), so an unfiltered seeded row must draw alike in every mode."""
    from atom_jax.sampler import sampling_mode
    from atom_jax.sampling_params import SamplingParams
    rows = jnp.tile(jnp.asarray(logits, jnp.float32), (64, 1))
    sp = dict(temperature=jnp.full(64, 0.8, jnp.float32), top_k=jnp.zeros(64, jnp.int32),
              top_p=jnp.ones(64, jnp.float32), min_p=jnp.zeros(64, jnp.float32),
              seed=jnp.arange(64, dtype=jnp.uint32), step=jnp.zeros(64, jnp.int32),
              banned=jnp.full((64, 4), -1, jnp.int32))
    sampled = np.asarray(sample_jit(rows, sp, None, mode="sample")[0])
    filtered = np.asarray(sample_jit(rows, sp, None, mode="filter")[0])
    assert (sampled == filtered).all() and len(set(sampled)) > 5
    greedy = SamplingParams(temperature=0)
    assert sampling_mode([greedy], False) == "greedy"
    assert sampling_mode([greedy, SamplingParams(temperature=0.6)], False) == "sample"
    assert sampling_mode([greedy, SamplingParams(temperature=0.6, top_p=0.9)], False) == "filter"
    assert sampling_mode([greedy], True) == "filter"
