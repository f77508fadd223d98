"""Tiny Flax Linen model families of the kinds users bring, written as their authors would.

None of them knows about adapters. Each is small enough to compile in well
under a second, and each exercises something different: Flax's own attention
layers, ``nn.scan(nn.remat(...))`` with ``nn.SelfAttention`` (whose
``__call__`` calls ``super().__call__``), setup-style modules with several
methods (encode/decode), convolutions with BatchNorm, and a NeMo-style
Conformer layer (convolution + attention, with a padding mask).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB, D, HEADS, FF = 37, 16, 2, 24
MAX_LENGTH = 16  # learned absolute positions (GPT)


class AddNorm(nn.Module):
    """Post-LN residual sub-block output, as in BERT: ``LayerNorm(dropout(h) + residual)``."""

    rate: float = 0.1

    @nn.compact
    def __call__(self, hidden, residual, deterministic: bool = True):
        hidden = nn.Dropout(self.rate, name="dropout")(hidden, deterministic=deterministic)
        return nn.LayerNorm(epsilon=1e-12, name="LayerNorm")(hidden + residual)


class BertLayer(nn.Module):
    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        h = nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, dropout_rate=0.1, name="attention")(
            x, x, mask=mask, deterministic=deterministic
        )
        x = AddNorm(name="attention_add")(h, x, deterministic)
        h = nn.gelu(nn.Dense(FF, name="intermediate")(x))
        h = nn.Dense(D, name="output")(h)
        return AddNorm(name="output_add")(h, x, deterministic)


class BertEncoder(nn.Module):
    """A BERT-style encoder built from Flax's ``nn.MultiHeadDotProductAttention``."""

    num_layers: int = 1

    @nn.compact
    def __call__(self, ids, padding, deterministic: bool = True):
        x = nn.Embed(VOCAB, D, name="embeddings")(ids)
        x = x + self.param("position_embeddings", nn.initializers.normal(0.02), (ids.shape[1], D))
        x = nn.LayerNorm(name="embeddings_norm")(x)
        mask = nn.make_attention_mask(padding, padding)
        for i in range(self.num_layers):
            x = BertLayer(name=f"layer_{i}")(x, mask, deterministic)
        return x


class GPTBlock(nn.Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, _):
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.SelfAttention(HEADS, qkv_features=D, dropout_rate=0.1, deterministic=self.deterministic, name="attention")(
            nn.LayerNorm(name="ln_1")(x), mask=causal
        )
        x = x + h
        h = nn.gelu(nn.Dense(FF, name="fc_in")(nn.LayerNorm(name="ln_2")(x)))
        h = nn.Dense(D, name="fc_out")(h)
        h = nn.Dropout(0.1)(h, deterministic=self.deterministic)
        return x + h, None


class GPT(nn.Module):
    """A GPT-style causal decoder whose layers are ``nn.scan(nn.remat(GPTBlock))``, with learned positions.

    The scan carries the ``adapter_losses`` collection along the layer axis,
    as any collection written inside a scan must be, and splits the dropout
    stream so that each layer draws its own masks.
    """

    num_layers: int = 2

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        x = nn.Embed(VOCAB, D, name="wte")(ids)
        x = x + nn.Embed(MAX_LENGTH, D, name="wpe")(jnp.arange(ids.shape[1]))
        layers = nn.scan(
            nn.remat(GPTBlock),
            variable_axes={"params": 0, "adapter_losses": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.num_layers,
        )
        x, _ = layers(deterministic, name="layers")(x, None)
        return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


class T5Block(nn.Module):
    causal: bool = False
    cross: bool = False

    @nn.compact
    def __call__(self, x, mask, encoded=None, cross_mask=None, deterministic: bool = True):
        attend = lambda name: nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, use_bias=False, name=name)
        h = nn.RMSNorm(name="self_norm")(x)
        x = x + attend("self_attention")(h, h, mask=mask, deterministic=deterministic)
        if self.cross:
            h = nn.RMSNorm(name="cross_norm")(x)
            x = x + attend("cross_attention")(h, encoded, mask=cross_mask, deterministic=deterministic)
        h = nn.RMSNorm(name="ffn_norm")(x)
        h = nn.relu(nn.Dense(FF, use_bias=False, name="wi")(h))
        return x + nn.Dense(D, use_bias=False, name="wo")(h)


class T5(nn.Module):
    """A T5-style encoder-decoder with cross-attention, setup-style, with ``encode`` and ``decode`` methods."""

    num_layers: int = 1

    def setup(self):
        self.shared = nn.Embed(VOCAB, D)
        self.encoder = [T5Block(name=f"encoder_{i}") for i in range(self.num_layers)]
        self.decoder = [T5Block(causal=True, cross=True, name=f"decoder_{i}") for i in range(self.num_layers)]
        self.final_norm = nn.RMSNorm()
        self.lm_head = nn.Dense(VOCAB, use_bias=False)

    def encode(self, src, deterministic: bool = True):
        x = self.shared(src)
        mask = nn.make_attention_mask(src > 0, src > 0)
        for block in self.encoder:
            x = block(x, mask, deterministic=deterministic)
        return x

    def decode(self, tgt, encoded, src, deterministic: bool = True):
        x = self.shared(tgt)
        mask = nn.make_causal_mask(tgt)
        cross_mask = nn.make_attention_mask(tgt >= 0, src > 0)
        for block in self.decoder:
            x = block(x, mask, encoded, cross_mask, deterministic=deterministic)
        return self.lm_head(self.final_norm(x))

    def __call__(self, src, tgt, deterministic: bool = True):
        return self.decode(tgt, self.encode(src, deterministic), src, deterministic)


class ViTBlock(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = nn.LayerNorm(name="norm_1")(x)
        x = x + nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, name="attention")(h, h, deterministic=deterministic)
        h = nn.gelu(nn.Dense(FF, name="mlp_in")(nn.LayerNorm(name="norm_2")(x)))
        return x + nn.Dense(D, name="mlp_out")(h)


class ViT(nn.Module):
    """A ViT: a convolutional patch embedding, a class token, pre-LN blocks, a head."""

    num_layers: int = 1
    patch: int = 4
    classes: int = 5

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        x = nn.Conv(D, (self.patch, self.patch), strides=self.patch, name="patch_embed")(images)
        x = x.reshape(x.shape[0], -1, D)
        cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, D)), (x.shape[0], 1, D))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (x.shape[1], D))
        for i in range(self.num_layers):
            x = ViTBlock(name=f"block_{i}")(x, deterministic)
        return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="norm")(x[:, 0]))


class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        h = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False, name="conv_1")(x)
        h = nn.relu(norm("bn_1")(h))
        h = norm("bn_2")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv_2")(h))
        if x.shape != h.shape:
            x = norm("bn_shortcut")(nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False, name="shortcut")(x))
        return nn.relu(h + x)


class ResNet(nn.Module):
    """A ResNet with BatchNorm (two basic blocks), for images ``(batch, height, width, channels)``."""

    classes: int = 5

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(images)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        x = BasicBlock(8, name="block_0")(x, train)
        x = BasicBlock(16, strides=2, name="block_1")(x, train)
        return nn.Dense(self.classes, name="head")(jnp.mean(x, axis=(1, 2)))


class ConvolutionModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise, BatchNorm, swish, pointwise."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(2 * D, (1,), name="pointwise_in")(nn.LayerNorm(name="norm")(x))
        h = nn.glu(h, axis=-1)
        h = nn.Conv(D, (3,), feature_group_count=D, padding="SAME", name="depthwise")(h)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="batch_norm")(h)
        return nn.Conv(D, (1,), name="pointwise_out")(nn.swish(h))


class ConformerLayer(nn.Module):
    """NeMo's Conformer layer: half FFN, self-attention, convolution, half FFN, LayerNorm.

    ``mask`` is ``[batch, time, time]``, True where attention is allowed (NeMo's
    ``att_mask``, negated to Flax's convention).
    """

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        def ffn(name, x):
            h = nn.swish(nn.Dense(FF, name=f"{name}_in")(nn.LayerNorm(name=f"{name}_norm")(x)))
            return nn.Dense(D, name=f"{name}_out")(h)

        x = x + 0.5 * ffn("ffn_1", x)
        h = nn.LayerNorm(name="attention_norm")(x)
        x = x + nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, name="self_attention")(
            h, h, mask=mask[:, None], deterministic=not train
        )
        x = x + ConvolutionModule(name="convolution")(x, train)
        x = x + 0.5 * ffn("ffn_2", x)
        return nn.LayerNorm(name="out_norm")(x)


class Conformer(nn.Module):
    """A Conformer-style ASR encoder over features ``(batch, time, feat)`` with lengths."""

    num_layers: int = 1

    @nn.compact
    def __call__(self, features, lengths, train: bool = False):
        valid = jnp.arange(features.shape[1])[None, :] < lengths[:, None]
        mask = valid[:, :, None] & valid[:, None, :]
        x = nn.Dense(D, name="pre_encode")(features)
        for i in range(self.num_layers):
            x = ConformerLayer(name=f"layers_{i}")(x, mask, train)
        return jnp.where(valid[..., None], x, 0.0)


def token_batch(key: jax.Array, batch: int = 3, length: int = 6, lengths=(6, 4, 2)):
    """Token ids in [1, VOCAB) with zero padding after each row's length, and the padding mask."""
    ids = jax.random.randint(key, (batch, length), 1, VOCAB)
    valid = jnp.arange(length)[None, :] < jnp.asarray(lengths)[:batch, None]
    return jnp.where(valid, ids, 0), valid
