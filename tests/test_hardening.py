"""The core on code nobody here wrote: each test reproduces one defect found on third-party models."""

from __future__ import annotations

import collections
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadapters as ja
from architectures import families as zoo_families
from models import perturb_adapters

COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class CountingAdd(ja.Strategy):
    """Residual add that counts, at run time, how often it joins a call."""

    def __call__(self, adapter, value, ctx):
        jax.debug.callback(lambda: COUNTS.update([ctx.path]))
        return value + adapter(value)


def test_adapters_on_a_module_that_calls_super_run_once_per_call():
    """nn.SelfAttention.__call__ calls super().__call__: its adapters still run once."""
    attention = nn.SelfAttention(num_heads=2, qkv_features=8, name="attn")
    x = jnp.ones((2, 3, 8))
    params = attention.init(jax.random.key(0), x)
    model = ja.with_adapters(attention, {"attn": ""}).add_adapter("a", ja.LinearAdapter(4), strategy=CountingAdd())
    variables = ja.init_adapters(model, params, jax.random.key(1), x)
    COUNTS.clear()
    jax.block_until_ready(model.apply(variables, x))
    assert COUNTS == {"": 1}
    COUNTS.clear()
    jax.block_until_ready(jax.jit(model.apply)(variables, x))
    assert COUNTS == {"": 1}


class FlagModel(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False, deterministic: bool = True, mode: str = "a"):
        h = nn.Dense(4, name="fc")(x)
        h = nn.Dropout(0.5)(h, deterministic=deterministic)
        h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
        return h * (2.0 if mode == "b" else 1.0)


def test_init_adapters_passes_python_flags_as_they_are():
    base = FlagModel()
    x = jnp.ones((4, 3))
    params = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"fc": "fc"}).add_adapter("a", ja.LinearAdapter(2))
    for kwargs in ({"train": False}, {"deterministic": True}, {"train": False, "deterministic": True, "mode": "b"}):
        variables = ja.init_adapters(model, params, jax.random.key(1), x, **kwargs)
        assert "__adapters__" in variables["params"]["fc"]


def test_bare_params_are_refused_with_a_hint():
    base = nn.Dense(3)
    x = jnp.ones((1, 3))
    params = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"d": ""}).add_adapter("a", ja.LinearAdapter(2))
    with pytest.raises(ja.AdapterError, match=r"dict of collections.*keys are \['bias', 'kernel'\].*\{'params': params\}"):
        ja.init_adapters(model, params["params"], jax.random.key(1), x)


def test_variables_missing_base_params_are_refused_not_reinitialised():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="second")(nn.Dense(3, name="first")(x))

    x = jnp.ones((1, 3))
    params = Two().init(jax.random.key(0), x)
    partial = {"params": {"first": params["params"]["first"]}}
    model = ja.with_adapters(Two(), {"first": "first"}).add_adapter("a", ja.LinearAdapter(2))
    with pytest.raises(ja.AdapterError, match=r"lack 2 base parameter\(s\).*params/second/bias"):
        ja.init_adapters(model, partial, jax.random.key(1), x)


def test_lora_sizes_itself_to_non_square_and_multi_head_layers():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            fused = nn.Dense(3 * x.shape[-1], name="qkv")(x)  # GPT-2's c_attn shape
            q = nn.DenseGeneral((2, 4), name="query")(x)  # (..., heads, head_dim)
            out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(q)  # back to (..., d)
            return out + fused[..., : x.shape[-1]]

    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = Attention().init(jax.random.key(1), x)
    model = ja.with_adapters(Attention(), {"all": ["qkv", "query", "out"]}).add_adapter("lora", ja.LoRA(rank=2))
    variables = perturb_adapters(ja.init_adapters(model, params, jax.random.key(2), x))
    lora = variables["params"]
    shapes = {k: lora[k]["__adapters__"]["lora"]["lora_b"]["kernel"].shape for k in ("qkv", "query", "out")}
    assert shapes == {"qkv": (2, 24), "query": (2, 8), "out": (2, 8)}
    assert lora["out"]["__adapters__"]["lora"]["lora_a"]["kernel"].shape == (8, 2)

    # Each LoRA adds exactly scaling * x A B (in the layer's own output shape).
    def delta(name, inp):
        p = lora[name]["__adapters__"]["lora"]
        return (inp.reshape(inp.shape[:2] + (-1,)) @ p["lora_a"]["kernel"] @ p["lora_b"]["kernel"]) * 4.0

    q_base = nn.DenseGeneral((2, 4)).apply({"params": params["params"]["query"]}, x)
    q = q_base + delta("query", x).reshape(q_base.shape)
    out = nn.DenseGeneral(8, axis=(-2, -1)).apply({"params": params["params"]["out"]}, q) + delta("out", q)
    fused = nn.Dense(24).apply({"params": params["params"]["qkv"]}, x) + delta("qkv", x)
    np.testing.assert_allclose(model.apply(variables, x), out + fused[..., :8], rtol=1e-5, atol=1e-5)


class ScanStack(nn.Module):
    carry_losses: bool
    split_dropout: bool = True

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return x + nn.Dense(x.shape[-1], name="fc")(x), None

        axes = {"params": 0, "adapter_losses": 0} if self.carry_losses else {"params": 0}
        layers = nn.scan(Block, variable_axes=axes, split_rngs={"params": True, "dropout": self.split_dropout}, length=3)
        return layers(name="layers")(x, None)[0]


def test_aux_loss_inside_a_scan_is_recorded_or_a_clear_error():
    x = jax.random.normal(jax.random.key(0), (4, 6))
    adapter = ja.LinearAdapter(3)
    for carry in (True, False):
        base = ScanStack(carry)
        params = base.init(jax.random.key(1), x)
        model = ja.with_adapters(base, {"fc": "layers/fc"}).add_adapter(
            "a", adapter, strategy=ja.ResidualAdd(l2_lambda=0.5)
        )
        variables = perturb_adapters(ja.init_adapters(model, params, jax.random.key(2), x))
        trainer = model.clone(training=True)
        if carry:
            out, state = trainer.apply(variables, x, mutable=[ja.LOSS_COLLECTION])
            losses = state[ja.LOSS_COLLECTION]["layers"]["fc"]["__adapters__"]["a"]["l2_loss"]
            assert losses[0].shape == (3,) and bool((losses[0] > 0).all())
            assert float(ja.sum_adapter_losses(state)) > 0
        else:
            with pytest.raises(ja.AdapterError, match=r"adapter 'a' at 'layers/fc' records an auxiliary loss.*"
                                                      r"add 'adapter_losses': 0 to that transform's variable_axes"):
                trainer.apply(variables, x, mutable=[ja.LOSS_COLLECTION])


KEYS: list = []


@dataclasses.dataclass(frozen=True)
class RecordDropoutKey(ja.Strategy):
    """Records the 'dropout' key a strategy draws (as stochastic depth does), changes nothing."""

    def __call__(self, adapter, value, ctx):
        if ctx.training:
            key = jax.random.key_data(ctx.make_rng("dropout"))
            jax.debug.callback(lambda k: KEYS.append(tuple(np.asarray(k).tolist())), key)
        return value + 0 * adapter(value)


@pytest.mark.parametrize("split", [True, False])
def test_stochastic_depth_keys_in_a_scan_differ_per_layer_only_when_the_stream_is_split(split):
    """Documented: inside nn.scan each layer draws its own mask only if the scan splits 'dropout'."""
    x = jnp.ones((1, 4))
    base = ScanStack(True, split_dropout=split)
    params = base.init(jax.random.key(1), x)
    model = ja.with_adapters(base, {"fc": "layers/fc"}).add_adapter("a", ja.LinearAdapter(2), strategy=RecordDropoutKey())
    variables = ja.init_adapters(model, params, jax.random.key(2), x)
    KEYS.clear()
    jax.block_until_ready(model.clone(training=True).apply(variables, x, rngs={"dropout": jax.random.key(3)}))
    layers = KEYS[-3:]  # the scan's three layers (Flax may run the body once more before the loop)
    assert len(set(layers)) == (3 if split else 1)


# ---- methods other than __call__ run the adapters too ---------------------------------------


def t5_with_adapters():
    base = zoo_families.T5()
    src = jnp.array([[3, 4, 5, 0], [6, 7, 0, 0]])
    tgt = jnp.array([[1, 2, 3], [4, 5, 6]])
    params = base.init(jax.random.key(0), src, tgt)
    model = ja.with_adapters(base, {"encoder": "encoder_*/wo", "decoder": "decoder_*/wo", "query": "query"})
    model = model.add_adapter("encoder:enc", ja.LinearAdapter(4)).add_adapter("decoder:dec", ja.LinearAdapter(4))
    model = model.add_adapter("query:lora", ja.LoRA(rank=2))
    variables = perturb_adapters(ja.init_adapters(model, params, jax.random.key(1), src, tgt))
    return base, params, model, variables, src, tgt


def test_encode_and_decode_methods_run_their_adapters():
    base, params, model, variables, src, tgt = t5_with_adapters()
    full = model.apply(variables, src, tgt)
    encoded = model.apply(variables, src, method="encode")
    assert not np.allclose(encoded, base.apply(params, src, method="encode"), atol=1e-4)
    np.testing.assert_array_equal(model.apply(variables, src, method=zoo_families.T5.encode), encoded)
    np.testing.assert_array_equal(model.apply(variables, src, method=lambda m, s: m.encode(s)), encoded)
    decoded = jax.jit(lambda v, e: model.apply(v, tgt, e, src, method=zoo_families.T5.decode))(variables, encoded)
    np.testing.assert_allclose(decoded, full, rtol=1e-6, atol=1e-6)
    # Disabled, a method is the base's method exactly.
    off = model.set_enabled_adapters(enabled=False)
    np.testing.assert_array_equal(off.apply(variables, src, method="encode"), base.apply(params, src, method="encode"))
    with pytest.raises(ja.AdapterError, match="the wrapped model T5 has no method 'encoder_forward'"):
        model.apply(variables, src, method="encoder_forward")


def test_a_parent_module_calls_a_method_of_its_adapted_submodule():
    _, _, model, variables, src, tgt = t5_with_adapters()

    class Parent(nn.Module):
        body: nn.Module

        @nn.compact
        def __call__(self, src):
            return self.body.call_method("encode", src)

    parent_variables = {"params": {"body": variables["params"]}}
    np.testing.assert_array_equal(
        Parent(model).apply(parent_variables, src), model.apply(variables, src, method="encode")
    )


try:
    from architectures import hf
except ImportError:  # transformers<5 with Flax models is not installed
    hf = None
needs_hf = pytest.mark.skipif(hf is None, reason="needs transformers<5 with its Flax models")


@needs_hf
def test_hugging_face_gpt2_generation_steps_with_a_cache_run_the_adapters():
    module, base = hf.HF_GPT2.built()
    model = ja.with_adapters(module, "hf_gpt2").add_adapter("qkv:lora", ja.LoRA(rank=2))
    model = model.add_adapter("ffn", ja.LinearAdapter(4))
    prompt = jnp.array([[5, 6, 7], [8, 9, 10]])
    steps, length = 3, 6
    positions = lambda start, n: jnp.broadcast_to(jnp.arange(start, start + n), (2, n))
    ones = jnp.ones((2, length), jnp.int32)
    variables = perturb_adapters(
        ja.init_adapters(model, base, jax.random.key(1), prompt, jnp.ones_like(prompt), positions(0, 3))
    )
    cache = module.init(jax.random.key(0), jnp.ones((2, length), jnp.int32), ones, positions(0, length),
                        init_cache=True)["cache"]

    step = jax.jit(lambda v, cache, ids, pos: model.apply({**v, "cache": cache}, ids, ones, pos, mutable=["cache"]))
    out, state = step(variables, cache, prompt, positions(0, 3))
    tokens, logits = [prompt], [out.logits]
    for t in range(steps):
        nxt = jnp.argmax(logits[-1][:, -1], axis=-1)[:, None]
        tokens.append(nxt)
        out, state = step(variables, state["cache"], nxt, positions(3 + t, 1))
        logits.append(out.logits)
    sequence = jnp.concatenate(tokens, axis=1)[:, :length]
    cached = jnp.concatenate(logits, axis=1)[:, :length]
    full = model.apply(variables, sequence, ones, positions(0, length)).logits
    np.testing.assert_allclose(cached, full, rtol=2e-5, atol=2e-5)
    plain = module.apply(base, sequence, ones, positions(0, length)).logits
    assert not np.allclose(full, plain, atol=1e-3)


@needs_hf
def test_hugging_face_t5_encoder_and_decoder_as_separate_calls():
    module, base = hf.HF_T5.built()
    model = ja.with_adapters(module, "hf_t5").add_adapter("query+value:lora", ja.LoRA(rank=2))
    ids, mask, tgt, tgt_mask = hf.HF_T5.inputs(1)
    variables = perturb_adapters(ja.init_adapters(model, base, jax.random.key(1), ids, mask, tgt, tgt_mask))

    def encode(m, ids, mask):
        return m.encoder(ids, attention_mask=mask)[0]

    def decode(m, tgt, tgt_mask, encoded, mask):
        hidden = m.decoder(tgt, attention_mask=tgt_mask, encoder_hidden_states=encoded, encoder_attention_mask=mask)[0]
        return m.shared.attend(hidden * m.config.d_model**-0.5)

    encoded = model.apply(variables, ids, mask, method=encode)
    logits = model.apply(variables, tgt, tgt_mask, encoded, mask, method=decode)
    full = model.apply(variables, ids, mask, tgt, tgt_mask).logits
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    assert not np.allclose(encoded, module.apply(base, ids, mask, method=encode), atol=1e-4)


# ---- numerics and dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("offset, tolerance", [(100.0, 1e-5), (1000.0, 1e-4)])
def test_adapter_layernorm_uses_the_two_pass_variance_as_torch_does(offset, tolerance):
    """Against a float64 reference: float32 two-pass stays within rounding of the offset input;
    the fast variance (E[x^2] - E[x]^2, Flax's default) is far off on the same input."""
    x = offset + jax.random.normal(jax.random.key(0), (4, 64))
    adapter = ja.LinearAdapter(dim=8)
    params = perturb_adapters({"params": {"__adapters__": {"a": adapter.init(jax.random.key(1), x)["params"]}}})
    p = params["params"]["__adapters__"]["a"]
    out = adapter.apply({"params": p}, x)

    def rest(normed):
        h = normed * np.asarray(p["norm"]["scale"], np.float64) + np.asarray(p["norm"]["bias"], np.float64)
        h = h @ np.asarray(p["down"]["kernel"], np.float64)
        return (h / (1 + np.exp(-h))) @ np.asarray(p["up"]["kernel"], np.float64)

    xd = np.asarray(x, np.float64)
    reference = rest((xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5))
    np.testing.assert_allclose(out, reference, atol=tolerance * np.abs(reference).max())
    fast = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=True).apply({}, x)
    assert np.abs(rest(np.asarray(fast, np.float64)) - reference).max() > 4 * tolerance * np.abs(reference).max()


def test_adapters_take_dtype_and_param_dtype_as_flax_layers_do():
    x = jnp.ones((2, 8), jnp.bfloat16)
    for adapter in (ja.LinearAdapter(4, dtype=jnp.bfloat16), ja.LoRA(rank=2, dtype=jnp.bfloat16),
                    ja.MultiHeadAttentionAdapter(n_head=2, n_feat=8, dtype=jnp.bfloat16)):
        args = (x, x, x) if isinstance(adapter, ja.MultiHeadAttentionAdapter) else (x,)
        params = adapter.init(jax.random.key(0), *args)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
        assert adapter.apply(params, *args).dtype == jnp.bfloat16
        half = adapter.clone(param_dtype=jnp.bfloat16).init(jax.random.key(0), *args)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_l2_loss_of_a_bf16_model_is_computed_in_float32():
    """Adapter outputs of 1e-3 square to 1e-6: bf16 activations still give the exact float32 loss."""
    x = jnp.ones((2, 8), jnp.bfloat16)
    ctx_losses = {}

    class Ctx:
        training, name, path = True, "a", "m"

        def add_loss(self, value, name="l2_loss"):
            ctx_losses[name] = value

        def where(self):
            return "adapter 'a' at 'm'"

    out = jnp.full((2, 8), 1e-3, jnp.float32)
    result = ja.ResidualAdd(l2_lambda=1.0).add(x, out, Ctx())
    assert result.dtype == jnp.bfloat16
    np.testing.assert_allclose(ctx_losses["l2_loss"], 8 * 1e-6, rtol=1e-5)


def test_a_strategy_that_changes_the_dtype_is_an_error_naming_it():
    @dataclasses.dataclass(frozen=True)
    class Upcast(ja.Strategy):
        def __call__(self, adapter, value, ctx):
            return (value + adapter(value)).astype(jnp.float32)

    base = nn.Dense(4, dtype=jnp.bfloat16)
    x = jnp.ones((2, 4), jnp.bfloat16)
    params = base.init(jax.random.key(0), x)
    model = ja.with_adapters(base, {"d": ""}).add_adapter("up", ja.LinearAdapter(2), strategy=Upcast())
    with pytest.raises(ja.AdapterError, match=r"adapter 'up' at '': its strategy's result \(Upcast\) has \(shape, dtype\) "
                                              r"\(\(2, 4\), 'float32'\), but the hooked value has \(\(2, 4\), 'bfloat16'\)"):
        ja.init_adapters(model, params, jax.random.key(1), x)


# ---- bad inputs get clear errors -------------------------------------------------------------


def test_residual_add_on_a_module_returning_a_tuple_names_the_adapter():
    class Pair(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="a")(x), nn.Dense(4, name="b")(x)

    x = jnp.ones((1, 4))
    model = ja.with_adapters(Pair(), {"pair": ""}).add_adapter("t", ja.LinearAdapter(2))
    with pytest.raises(ja.AdapterError, match=r"adapter 't' at '': ResidualAdd joins an array, but the module "
                                              r"returns a tuple of 2; target a submodule"):
        ja.init_adapters(model, Pair().init(jax.random.key(0), x), jax.random.key(1), x)


def test_adapter_dropout_in_training_without_a_dropout_key_names_the_adapter():
    base = nn.Dense(4)
    x = jnp.ones((2, 4))
    model = ja.with_adapters(base, {"d": ""}).add_adapter("drop", ja.LinearAdapter(2, dropout=0.5))
    variables = ja.init_adapters(model, base.init(jax.random.key(0), x), jax.random.key(1), x)
    with pytest.raises(ja.AdapterError, match=r"adapter 'drop' at '' needs a PRNG stream it was not given.*"
                                              r"rngs=\{'dropout': key\}"):
        model.clone(training=True).apply(variables, x)


@pytest.mark.parametrize("kwargs, message", [
    ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\), got 1.5"),
    ({"rank": 0}, "rank must be a positive int, got 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number, got nan"),
])
def test_lora_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ja.LoRA(**kwargs)
