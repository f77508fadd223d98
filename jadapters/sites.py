"""Sites: where prompt and prefix tuning reach into a model, declared once per model family.

A role names one module (``query``, ``ffn_output``); some methods need more:
prefix tuning must find an attention layer's key and value projections and
its mask argument, prompt tuning the token embedding and the mask of the
model's call. A site is a frozen dataclass saying exactly that, with module
paths relative to the module it describes. Presets carry them
(:class:`jadapters.Preset` ``sites=``); the shipped Hugging Face presets
declare theirs, and a model of your own opts in with a few lines::

    site = AttentionSite("attn", key="k_proj", value="v_proj",
                         mask=MaskArgument("mask", kind="attention"))
    preset = Preset.make("mine", {}, sites={"attention": site})
    adapted = with_adapters(model, preset).add_adapter("prefix", "prefix_tuning[num_virtual_tokens=8]")

Site names methods look for: ``"attention"`` and ``"cross_attention"``
(:class:`AttentionSite`), ``"embeddings"`` (:class:`EmbeddingSite`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.naming import normalize_targets

#: Mask layouts: ``"padding"`` is ``(batch, keys)`` (Hugging Face's ``attention_mask``),
#: ``"attention"`` is ``(..., queries, keys)`` (Flax's ``nn.make_attention_mask``).
MASK_KINDS = ("padding", "attention")

ATTENTION, CROSS_ATTENTION, EMBEDDINGS = "attention", "cross_attention", "embeddings"

#: The semantics prompt and prefix tuning offer: Hugging Face PEFT's and AdapterHub's.
STYLES = ("peft", "adapterhub")


@dataclasses.dataclass(frozen=True)
class MaskArgument:
    """The argument of a module call that holds an attention mask, and its layout.

    Attributes:
        name: the keyword, e.g. ``'attention_mask'`` or ``'mask'``.
        index: its position when passed positionally (None: keyword only).
        kind: ``'padding'`` (``(batch, keys)``, 1/True = attend) or ``'attention'``
            (``(..., queries, keys)``, broadcastable, True = attend).

    Example:
        >>> import jax.numpy as jnp
        >>> mask = MaskArgument("mask", 1)
        >>> args, kwargs = mask.replace((0, jnp.ones((2, 3))), {}, lambda m: m[:, :1])
        >>> args[1].shape
        (2, 1)
    """

    name: str
    index: int | None = None
    kind: str = "padding"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a mask argument needs a name, got {self.name!r}")
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0):
            raise ValueError(f"mask index must be an int >= 0 or None, got {self.index!r}")
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {self.kind!r}")

    def get(self, args: tuple, kwargs: dict) -> Any:
        """The mask the call was given, or None."""
        if self.name in kwargs:
            return kwargs[self.name]
        if self.index is not None and self.index < len(args):
            return args[self.index]
        return None

    def replace(self, args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the mask replaced by ``change(mask)``; unchanged when there is none."""
        mask = self.get(args, kwargs)
        if mask is None:
            return args, kwargs
        if self.name in kwargs:
            return args, {**kwargs, self.name: change(mask)}
        return args[: self.index] + (change(mask),) + args[self.index + 1 :], kwargs


def insert_ones(mask: Any, count: int, at: int, axes: tuple[int, ...]) -> Any:
    """``mask`` with ``count`` attend-everywhere entries inserted at index ``at`` of each of ``axes``.

    Axes of length 1 broadcast and stay as they are.

    Example:
        >>> import jax.numpy as jnp
        >>> insert_ones(jnp.zeros((1, 3), jnp.int32), 2, 0, (-1,)).tolist()
        [[1, 1, 0, 0, 0]]
    """
    mask = jnp.asarray(mask)
    for axis in axes:
        if mask.shape[axis] == 1:
            continue
        shape = list(mask.shape)
        shape[axis] = count
        ones = jnp.ones(shape, mask.dtype)
        head, tail = jnp.split(mask, [at], axis=axis)
        mask = jnp.concatenate([head, ones, tail], axis=axis)
    return mask


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """An attention layer, as prefix tuning reaches into it.

    Paths of projections are relative to the attention module.

    Attributes:
        targets: the attention modules (paths, globs or regexes; PEFT's suffix rule for plain names).
        key / value: the key and value projections; their outputs get the learned prefix along
            the sequence axis.
        qkv: instead, one fused projection whose output's last axis is ``[queries | keys | values]``
            in equal thirds (Hugging Face's GPT-2 ``c_attn``); needs ``pad_queries``.
        mask: the attention module's mask argument; it gets attend-everywhere entries for the prefix.
        pad_queries: the prefix also enters as placeholder rows in front of the module's first
            argument, replaced by the prefix in the key and value projections' outputs and dropped
            from the module's output: for layers that build a causal mask or reshape from the query
            length (Hugging Face's GPT-2 and ViT). The causal mask then lets every token see the
            whole prefix.
        output: with ``pad_queries``, the index of the attention output in the module's output
            tuple (None: the output is that array).
        sequence_axis: the sequence axis of the projections' outputs and of the module's input.

    Example: an attention layer of your own opts in with a site
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jadapters
        >>> class Attention(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, mask):
        ...         q, k, v = (nn.Dense(4, name=n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        ...         scores = jnp.where(mask, q @ k.swapaxes(-1, -2) / 2.0, -1e9)
        ...         return jax.nn.softmax(scores) @ v
        >>> site = AttentionSite("", key="k_proj", value="v_proj", mask=MaskArgument("mask", 1, kind="attention"))
        >>> preset = jadapters.Preset.make("mine", {}, sites={"attention": site})
        >>> adapted = jadapters.with_adapters(Attention(), preset)
        >>> adapted = adapted.add_adapter("p", "prefix_tuning[num_virtual_tokens=2]")
        >>> x, mask = jnp.ones((1, 3, 4)), jnp.ones((1, 3, 3), bool)
        >>> params = Attention().init(jax.random.key(0), x, mask)
        >>> variables = jadapters.init_adapters(adapted, params, jax.random.key(1), x, mask)
        >>> adapted.apply(variables, x, mask).shape, variables["params"]["__adapters__"]["p"]["keys"].shape
        ((1, 3, 4), (2, 4))
    """

    targets: Any
    key: str | None = "key"
    value: str | None = "value"
    qkv: str | None = None
    mask: MaskArgument | None = None
    pad_queries: bool = False
    output: int | None = None
    sequence_axis: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        if not self.targets:
            raise ValueError("an attention site needs targets")
        if self.qkv is not None:
            if not self.pad_queries:
                raise ValueError("an attention site with a fused qkv projection needs pad_queries=True")
            object.__setattr__(self, "key", None)
            object.__setattr__(self, "value", None)
        elif not (self.key and self.value):
            raise ValueError("an attention site names its key and value projections, or a fused qkv")
        if self.mask is not None and not isinstance(self.mask, MaskArgument):
            raise ValueError(f"mask must be a MaskArgument, got {self.mask!r}")


@dataclasses.dataclass(frozen=True)
class EmbeddingSite:
    """Where a model embeds its tokens, as prompt tuning (and PEFT's prefix tuning) reaches into it.

    Paths are relative to ``module``, the module whose call covers the
    embeddings and the layers and takes the mask (by default the model itself).

    Attributes:
        module: that module's path (``''``: the model's root).
        word_embeddings: the token embedding; PEFT's prompts go in front of its output, so they
            get position and type embeddings and the embedding LayerNorm like words.
        position_embeddings: modules called with position ids: with PEFT's prompts they get
            ``0 .. P+T-1``; PEFT's prefix shifts them by P (the prefix acts as a cache).
        token_type_embeddings: modules called with token-type ids; PEFT drops those (zeros).
        embeddings: AdapterHub's place: the module whose output is the finished embedding
            (after positions, types and normalisation); the prompts go in front of it.
        embeddings_argument: instead of that module's output, this argument of its call
            (index or keyword), for models that add positions without a module of their own.
        within: calls of the modules above count only inside this module's call (T5 shares
            its token embedding between encoder and decoder: ``within='encoder'``).
        mask: the mask argument of ``module``'s call; prompts get attend-everywhere entries.
        sequence_axis: the sequence axis of embeddings and ids.

    Example:
        >>> EmbeddingSite(word_embeddings="wte", position_embeddings=("wpe",)).position_embeddings
        ('wpe',)
    """

    module: str = ""
    word_embeddings: str | None = None
    position_embeddings: tuple[str, ...] = ()
    token_type_embeddings: tuple[str, ...] = ()
    embeddings: str | None = None
    embeddings_argument: int | str | None = None
    within: str | None = None
    mask: MaskArgument | None = None
    sequence_axis: int = 1

    def __post_init__(self) -> None:
        for name in ("position_embeddings", "token_type_embeddings"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.word_embeddings is None and self.embeddings is None and not self.position_embeddings:
            raise ValueError("an embedding site names word_embeddings, embeddings or position_embeddings")
        if self.embeddings_argument is not None and self.embeddings is None:
            raise ValueError("embeddings_argument needs the module it belongs to (embeddings=...)")
        if self.mask is not None and not isinstance(self.mask, MaskArgument):
            raise ValueError(f"mask must be a MaskArgument, got {self.mask!r}")


def adapter_length(adapter: Callable[..., Any]) -> int:
    """The ``length`` field (prompt or prefix length) of the adapter a strategy was handed."""
    length = getattr(getattr(adapter, "module", None), "length", None)
    if isinstance(length, bool) or not isinstance(length, int):
        raise AdapterError(f"prompt and prefix strategies need an adapter with an int 'length' field, got {adapter!r}")
    return length


def run_hooked(site: Any, hooks: dict, call: Callable[..., Any], args: tuple, kwargs: dict, ctx: AdapterContext,
               within: str | None = None) -> Any:
    """``call(*args, **kwargs)`` with the child ``hooks`` active (only inside the call of the child
    ``within`` if given); raises unless every hooked submodule ran: a site naming a submodule that
    is never called would otherwise change nothing, silently."""
    ran: set[str] = set()

    def marked(name, hook):
        def run(call_, *a, **k):
            ran.add(name)
            return hook(call_, *a, **k)

        return run

    active = {name: marked(name, hook) for name, hook in hooks.items()}
    if within is not None:
        inner = active

        def scoped(call_, *a, **k):
            with ctx.intercept_children(inner):
                return call_(*a, **k)

        active = {within: marked(within, scoped)}
    with ctx.intercept_children(active):
        out = call(*args, **kwargs)
    missing = [name for name in ([within] if within else []) + list(hooks) if name not in ran]
    if missing:
        raise AdapterError(
            f"{ctx.where()}: the site {site} names the submodule(s) {missing}, which this call never ran; "
            f"the module's submodules are called by their paths relative to {ctx.path!r}"
        )
    return out
