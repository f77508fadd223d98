"""NeMo's adapter tutorial, done with jadapters.

NeMo's tutorial builds an encoder-decoder of residual MLPs and then edits
every class (mixins, dispatch methods, a registry) so that adapters can be
added. With jadapters the model's code stays as it is: ``with_adapters``
wraps it, and adapters are added to its submodules by name.

Run: ``python examples/nemo_tutorial.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

import jadapters

# ---- 1. The pretrained model: plain Flax, no adapter code anywhere --------------------------


class MLP(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="ln")(nn.Dense(self.dim, name="fc")(x))


class ResidualMLP(nn.Module):
    dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = x + MLP(self.dim, name=f"layers_{i}")(x)
        return x


class SimpleModel(nn.Module):
    dim: int = 512
    out_features: int = 10

    @nn.compact
    def __call__(self, x):
        y = ResidualMLP(self.dim, num_layers=4, name="encoder")(x)
        z = ResidualMLP(self.dim, num_layers=2, name="decoder")(y)
        return nn.Dense(self.out_features, name="projection")(z)


# ---- 2. A custom strategy: f(x) = scale * x * adapter(x), in five lines ---------------------


@dataclasses.dataclass(frozen=True)
class Multiply(jadapters.Strategy):
    scale: float = 1.0

    def __call__(self, adapter, value, ctx):
        return self.scale * value * adapter(value)


# ---- 3. A custom adapter: any Flax module will do --------------------------------------------


class SimpleModuleAdapter(nn.Module):
    """A bias-free Linear initialised to the identity: with Multiply it squares its input."""

    @nn.compact
    def __call__(self, x):
        eye = lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], dtype=dtype)
        return nn.Dense(x.shape[-1], use_bias=False, kernel_init=eye, name="linear")(x)


def main(dim: int = 512) -> None:
    x = jax.random.normal(jax.random.key(0), (8, dim))
    base = SimpleModel(dim)
    base_vars = base.init(jax.random.key(0), x)  # stands in for pretrained weights
    base_out = base.apply(base_vars, x)
    print(f"base model: {jadapters.count_parameters(base_vars):,} params, output {base_out.shape}")

    # Module names map to submodule paths; bare ("global") names go to the encoder only,
    # as NeMo's global config encoder_adapter=True, decoder_adapter=False.
    model = jadapters.with_adapters(
        base,
        {"encoder": "encoder/layers_*", "decoder": "decoder/layers_*"},
        global_modules=["encoder"],
    )
    model = model.add_adapter("adapter_1", jadapters.LinearAdapter(dim=5))  # global -> encoder
    model = model.add_adapter("decoder:adapter_2", jadapters.LinearAdapter(dim=5, norm_position="post"))
    try:
        model.add_adapter("decoder:adapter_1", jadapters.LinearAdapter(dim=10))
    except jadapters.AdapterError as error:
        print(f"duplicate name rejected: {error}")

    variables = jadapters.init_adapters(model, base_vars, jax.random.key(1), x)  # base params untouched
    out = model.apply(variables, x)
    print("enabled adapters:", model.get_enabled_adapters())
    print("fresh adapters leave the output unchanged:", bool(jnp.array_equal(out, base_out)))

    # Enabling and disabling returns new modules: the mask is static, so each jitted variant
    # compiles once and a disabled adapter costs nothing.
    off = model.set_enabled_adapters(enabled=False)
    only_2 = model.set_enabled_adapters("adapter_1", enabled=False)
    print("all disabled:", off.get_enabled_adapters(), "| one disabled:", only_2.get_enabled_adapters())
    print("adapters available:", off.is_adapter_available())

    # The custom adapter with the custom strategy, on one encoder block only.
    squared = model.add_adapter(
        "square", SimpleModuleAdapter(), strategy=Multiply(), targets="encoder/layers_3"
    )
    squared_vars = jadapters.init_adapters(squared, variables, jax.random.key(2), x)
    print("with the multiplication adapter, output changes:", not bool(jnp.allclose(squared.apply(squared_vars, x), base_out)))

    print()
    print(jadapters.adapter_summary(squared, squared_vars))


if __name__ == "__main__":
    main()
