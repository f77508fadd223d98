"""The adapter networks: NeMo's LinearAdapter and MultiHeadAttentionAdapter, and LoRA."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jadapters import LinearAdapter, LoRA, MHAResidualAdd, MultiHeadAttentionAdapter, ParallelAdd, ResidualAdd
from jadapters.adapters.activations import get_activation

X = jax.random.normal(jax.random.key(0), (2, 50))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_linear_adapter_outputs_zero_at_init(norm_position):
    adapter = LinearAdapter(dim=100, norm_position=norm_position)
    params = adapter.init(jax.random.key(1), X)
    out = adapter.apply(params, X)
    assert abs(float(out.sum())) <= 1e-8
    chex.assert_trees_all_equal(out, jnp.zeros_like(X))


def test_linear_adapter_pre_zeroes_the_last_dense_only():
    p = LinearAdapter(dim=10, norm_position="pre").init(jax.random.key(1), X)["params"]
    assert set(p) == {"norm", "down", "up"}
    assert not jnp.any(p["up"]["kernel"])
    assert jnp.any(p["down"]["kernel"])
    chex.assert_trees_all_equal(p["norm"]["scale"], jnp.ones(50))
    assert "bias" not in p["down"] and "bias" not in p["up"]  # bias-free Linears


def test_linear_adapter_post_zeroes_the_layernorm_scale_and_bias():
    p = LinearAdapter(dim=10, norm_position="post").init(jax.random.key(1), X)["params"]
    chex.assert_trees_all_equal(p["norm"]["scale"], jnp.zeros(50))
    chex.assert_trees_all_equal(p["norm"]["bias"], jnp.zeros(50))
    assert jnp.any(p["down"]["kernel"]) and jnp.any(p["up"]["kernel"])


def test_linear_adapter_matches_nemo_maths_when_trained():
    adapter = LinearAdapter(dim=6, activation="relu")
    params = adapter.init(jax.random.key(1), X)
    params = jax.tree_util.tree_map(lambda a: a + 0.3, params)
    p = params["params"]
    mean = X.mean(-1, keepdims=True)
    var = X.var(-1, keepdims=True)
    h = (X - mean) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    expected = np.maximum(h @ p["down"]["kernel"], 0) @ p["up"]["kernel"]
    np.testing.assert_allclose(adapter.apply(params, X), expected, rtol=1e-4, atol=1e-5)


def test_linear_adapter_init_is_pytorch_linear_uniform():
    p = LinearAdapter(dim=400).init(jax.random.key(1), X)["params"]
    bound = 1 / math.sqrt(50)
    kernel = p["down"]["kernel"]
    assert float(jnp.abs(kernel).max()) <= bound
    assert float(jnp.abs(kernel).max()) > 0.95 * bound


def test_swish_and_silu_are_the_same():
    a = LinearAdapter(dim=4, activation="swish")
    b = LinearAdapter(dim=4, activation="silu")
    params = jax.tree_util.tree_map(lambda t: t + 0.5, a.init(jax.random.key(0), X))
    chex.assert_trees_all_equal(a.apply(params, X), b.apply(params, X))
    chex.assert_trees_all_equal(get_activation("swish")(X), jax.nn.silu(X))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm_position": "middle"}, "norm_position must be one of"),
        ({"activation": "nope"}, "unknown activation 'nope'"),
        ({"dim": 0}, "dim must be a positive int"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\), got 1.5"),
    ],
)
def test_linear_adapter_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearAdapter(**{"dim": 4, **kwargs})


def test_linear_adapter_dropout_applies_to_the_output():
    adapter = LinearAdapter(dim=4, dropout=0.5)
    params = jax.tree_util.tree_map(lambda t: t + 0.5, adapter.init(jax.random.key(0), X))
    eval_out = adapter.apply(params, X)
    train_out = adapter.apply(params, X, deterministic=False, rngs={"dropout": jax.random.key(3)})
    dropped = train_out == 0
    assert 0 < int(dropped.sum()) < dropped.size
    np.testing.assert_allclose(train_out[~dropped], 2 * eval_out[~dropped], rtol=1e-6)


def test_linear_adapter_default_strategy_is_residual_add():
    assert LinearAdapter(dim=2).default_strategy() == ResidualAdd()
    assert MultiHeadAttentionAdapter(n_head=1, n_feat=4).default_strategy() == MHAResidualAdd()
    assert LoRA(rank=2).default_strategy() == ParallelAdd()


@settings(max_examples=5, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(0, 3),
    features=st.integers(1, 24),
    dim=st.integers(1, 16),
    norm_position=st.sampled_from(["pre", "post"]),
    activation=st.sampled_from(["swish", "relu", "gelu", "tanh", "identity"]),
)
def test_linear_adapter_is_zero_at_init_for_all_shapes(batch, seq, features, dim, norm_position, activation):
    shape = (batch,) + (5,) * seq + (features,)
    x = jax.random.normal(jax.random.key(batch * 31 + features), shape)
    adapter = LinearAdapter(dim=dim, norm_position=norm_position, activation=activation)
    out = adapter.apply(adapter.init(jax.random.key(dim), x), x)
    chex.assert_trees_all_equal(out, jnp.zeros_like(x))


def padding_mask(lengths, time):
    """[batch, time, time] True where both positions are real (not padding)."""
    valid = jnp.arange(time)[None, :] < jnp.asarray(lengths)[:, None]
    return valid[:, :, None] & valid[:, None, :]


@pytest.mark.parametrize("n_head", [1, 2, 10])
@pytest.mark.parametrize("proj_dim", [None, -1])
def test_mha_adapter_is_zero_at_init(n_head, proj_dim):
    x = jax.random.normal(jax.random.key(0), (2, 32, 50))
    mask = padding_mask([32, 20], 32)
    adapter = MultiHeadAttentionAdapter(n_head=n_head, n_feat=50, dropout_rate=0.0, proj_dim=proj_dim)
    params = adapter.init(jax.random.key(1), x, x, x, mask)
    out = adapter.apply(params, x, x, x, mask)
    p = params["params"]["linear_out"]
    assert float(p["kernel"].sum()) == 0.0 and float(p["bias"].sum()) == 0.0
    assert abs(float(out.sum())) <= 1e-8
    assert out.shape == x.shape
    width = n_head if proj_dim == -1 else 50
    assert params["params"]["linear_q"]["kernel"].shape == (50, width)


def test_mha_adapter_proj_dim_must_divide_by_heads():
    with pytest.raises(ValueError, match=r"proj_dim \(9\) must be divisible by n_head \(2\)"):
        MultiHeadAttentionAdapter(n_head=2, n_feat=50, proj_dim=9)
    with pytest.raises(ValueError, match=r"n_feat \(50\) must be divisible by n_head \(3\)"):
        MultiHeadAttentionAdapter(n_head=3, n_feat=50)
    assert MultiHeadAttentionAdapter(n_head=4, n_feat=50, proj_dim=8).projection_width == 8


def reference_mha(p, q, k, v, mask, n_head):
    """NeMo's maths in numpy: shared pre-norm, scaled dot product, masked_fill(-10000), masked_fill(0)."""

    def norm(x):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * p["pre_norm"]["scale"] + p["pre_norm"]["bias"]

    def proj(x, name):
        y = norm(x) @ p[name]["kernel"] + p[name]["bias"]
        b, t, w = y.shape
        return y.reshape(b, t, n_head, w // n_head).transpose(0, 2, 1, 3)

    qh, kh, vh = proj(q, "linear_q"), proj(k, "linear_k"), proj(v, "linear_v")
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
    masked = ~np.asarray(mask)[:, None]
    scores = np.where(masked, -10000.0, scores)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn = np.where(masked, 0.0, attn / attn.sum(-1, keepdims=True))
    ctx = (attn @ vh).transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)
    return ctx @ p["linear_out"]["kernel"] + p["linear_out"]["bias"]


@pytest.mark.parametrize("n_head, proj_dim", [(2, None), (2, 8), (5, -1)])
def test_mha_adapter_matches_nemo_maths(n_head, proj_dim):
    x = jax.random.normal(jax.random.key(0), (2, 7, 10))
    mask = padding_mask([7, 4], 7)
    adapter = MultiHeadAttentionAdapter(n_head=n_head, n_feat=10, proj_dim=proj_dim)
    params = adapter.init(jax.random.key(1), x, x, x, mask)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)
    out = adapter.apply(params, x, x, x, mask)
    expected = reference_mha(jax.tree_util.tree_map(np.asarray, params["params"]), *(np.asarray(x),) * 3, mask, n_head)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_lora_is_zero_at_init_and_low_rank_after():
    x = jax.random.normal(jax.random.key(0), (3, 6))
    lora = LoRA(rank=2, alpha=4.0, features=5)
    params = lora.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(lora.apply(params, x), jnp.zeros((3, 5)))
    params = jax.tree_util.tree_map(lambda a: a + 1.0, params)
    p = params["params"]
    expected = 2.0 * (x @ p["lora_a"]["kernel"]) @ p["lora_b"]["kernel"]
    np.testing.assert_allclose(lora.apply(params, x), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoRA(rank=0)
