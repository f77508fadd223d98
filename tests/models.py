"""Small Flax models shared by the tests (NeMo's fixtures, in Linen)."""

from __future__ import annotations

import flax.linen as nn
import jax


class LinearBN(nn.Module):
    """NeMo's test fixture: Linear(dim, dim) -> BatchNorm1d(dim)."""

    dim: int = 50

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.dim, name="fc")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)


class EncoderDecoder(nn.Module):
    """Two copies of the fixture, 'encoder' then 'decoder' (NeMo's model-level test)."""

    dim: int = 50

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = LinearBN(self.dim, name="encoder")(x, train)
        return LinearBN(self.dim, name="decoder")(x, train)


class MLP(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="ln")(nn.Dense(self.dim, name="fc")(x))


class SetupMLP(nn.Module):
    """The same block written setup-style (no @compact)."""

    dim: int

    def setup(self):
        self.fc = nn.Dense(self.dim)
        self.ln = nn.LayerNorm()

    def __call__(self, x):
        return self.ln(self.fc(x))


class ResidualMLP(nn.Module):
    dim: int
    num_layers: int
    setup_style: bool = False

    @nn.compact
    def __call__(self, x):
        block = SetupMLP if self.setup_style else MLP
        for i in range(self.num_layers):
            x = x + block(self.dim, name=f"layers_{i}")(x)
        return x


class SimpleModel(nn.Module):
    """NeMo's tutorial model: encoder (4 blocks), decoder (2 blocks), projection."""

    dim: int = 16
    out_features: int = 10
    setup_style: bool = False

    @nn.compact
    def __call__(self, x):
        x = ResidualMLP(self.dim, 4, self.setup_style, name="encoder")(x)
        x = ResidualMLP(self.dim, 2, self.setup_style, name="decoder")(x)
        return nn.Dense(self.out_features, name="projection")(x)


class ScannedBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x, _):
        return x + MLP(self.dim, name="mlp")(x), None


class ScannedStack(nn.Module):
    """``nn.scan(nn.remat(block))`` over ``num_layers`` layers, params stacked on axis 0."""

    dim: int = 8
    num_layers: int = 3

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            nn.remat(ScannedBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
        )
        x, _ = scan(self.dim, name="layers")(x, None)
        return x


class DropoutBNModel(nn.Module):
    """A model with Dropout and BatchNorm driven by its own ``train`` argument."""

    dim: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.dim, name="fc")(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(self.dim, name="out")(x)


def perturb(tree, key, scale=0.1):
    """Adds Gaussian noise to every leaf (to move adapters off their zero init)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    )


def perturb_adapters(variables, key=jax.random.key(7), scale=0.5):
    """Moves only the adapter variables off their init; base leaves stay the same objects."""
    import jadapters

    adapters, rest = jadapters.split_adapters(variables)
    return jadapters.merge_trees(rest, perturb(adapters, key, scale))
