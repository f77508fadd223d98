"""Prompt tuning: learned virtual tokens in front of the input sequence.

Lester et al.'s method as PEFT and AdapterHub implement it. ``P`` learned
vectors enter the sequence, the model's mask gets ``P`` attend-everywhere
entries, and the output keeps the ``P`` prompt positions (a sequence output
of ``T`` positions becomes ``P + T``; an output that is not per position,
such as a decoder's logits or a classifier's, keeps its shape). Where the
tokens are embedded and how the model takes its mask is an
:class:`jadapters.sites.EmbeddingSite` of the model's preset.

Two semantics, chosen by ``PromptTuningConfig(style=...)``:

* ``"peft"`` (default): the prompts go in front of the token embedding's
  output, before position and type embeddings and the embedding LayerNorm;
  the virtual tokens take positions ``0 .. P-1``, the real tokens move to
  ``P .. P+T-1``, token-type ids are dropped (zeros). Init N(0, 1).
* ``"adapterhub"``: the prompts go in front of the finished embeddings (no
  position or type embedding, no LayerNorm for them); the real tokens keep
  their positions. Init U(-0.5, 0.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters.checks import check_positive_int
from jadapters.configs import MethodConfig, Placed, check_options, register_method, resolve_alias
from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.registry import register_adapter, register_strategy
from jadapters.sites import EMBEDDINGS, STYLES, EmbeddingSite, adapter_length, insert_ones, run_hooked
from jadapters.strategies import AdapterFn, Strategy

#: Initialisations: PEFT's ``"RANDOM"`` is N(0, 1) (``"normal"``); AdapterHub's ``"random_uniform"`` is U(-0.5, 0.5).
PROMPT_INITS = {"normal": "normal", "uniform": "uniform", "RANDOM": "normal", "random_uniform": "uniform"}
POSITIONS = ("input", "embeddings")
COMBINES = ("prefix", "prefix_after_bos")


@register_adapter
class PromptTuning(nn.Module):
    """``length`` learned embeddings: ``__call__(features) -> (length, features)``, param ``embedding``.

    ``init_weights`` is ``'normal'`` (N(0, 1), PEFT's) or ``'uniform'`` (U(-0.5, 0.5),
    AdapterHub's). Place it with :class:`PrependPrompt` or through
    :class:`PromptTuningConfig`.

    Example:
        >>> import jax
        >>> prompt = PromptTuning(length=3)
        >>> params = prompt.init(jax.random.key(0), 8)
        >>> prompt.apply(params, 8).shape
        (3, 8)
    """

    length: int = 20
    init_weights: str = "normal"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check_options("PromptTuning", [self.init_weights], ("normal", "uniform"), "init_weights")
        super().__post_init__()

    @nn.compact
    def __call__(self, features: int) -> jax.Array:
        if self.init_weights == "normal":
            init = nn.initializers.normal(1.0)
        else:
            init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -0.5, 0.5)
        prompts = self.param("embedding", init, (self.length, features), self.param_dtype)
        return prompts if self.dtype is None else prompts.astype(self.dtype)


@register_strategy
@dataclasses.dataclass(frozen=True)
class PrependPrompt(Strategy):
    """Prompt tuning's join, at the call of ``site.module`` (the model, usually).

    The mask argument gets ``P`` attend-everywhere entries; the adapter's
    prompts enter the sequence: with ``position='input'`` (PEFT's) at the
    output of ``site.word_embeddings``, the position embeddings then called
    with ``0 .. P+T-1`` and the token-type embeddings with zeros; with
    ``position='embeddings'`` (AdapterHub's) at the output of
    ``site.embeddings`` (or its argument ``site.embeddings_argument``).
    ``combine='prefix'`` puts them first, ``'prefix_after_bos'`` after the
    first token (a BOS or class token, which then stays first).

    Example:
        >>> PrependPrompt(EmbeddingSite(word_embeddings="wte")).changes_shape
        True
    """

    changes_shape: ClassVar[bool] = True
    site: EmbeddingSite = None
    position: str = "input"
    combine: str = "prefix"

    def validate(self) -> None:
        if not isinstance(self.site, EmbeddingSite):
            raise ValueError(f"site must be an EmbeddingSite, got {self.site!r}")
        check_options("PrependPrompt", [self.position], POSITIONS, "position")
        check_options("PrependPrompt", [self.combine], COMBINES, "combine")
        needed = self.site.word_embeddings if self.position == "input" else self.site.embeddings
        if needed is None:
            field = "word_embeddings" if self.position == "input" else "embeddings"
            raise ValueError(
                f"position {self.position!r} needs the embedding site's {field}, which it does not name ({self.site})"
            )

    def around(self, adapter: AdapterFn, call, ctx: AdapterContext) -> Any:
        site, count = self.site, adapter_length(adapter)
        axis, at = site.sequence_axis, 0 if self.combine == "prefix" else 1
        args, kwargs = tuple(ctx.args), dict(ctx.kwargs)
        if site.mask is not None:
            extend = _padding_mask if site.mask.kind == "padding" else _attention_mask
            args, kwargs = site.mask.replace(args, kwargs, lambda m: extend(m, count, at))
        inserted = site.word_embeddings if self.position == "input" else site.embeddings
        entered: list[bool] = []

        def insert(x: Any) -> jax.Array:
            if entered:
                raise AdapterError(
                    f"{ctx.where()}: {inserted!r} ran twice in one call, so the prompts would enter twice; "
                    f"name the module whose call holds the right one as the site's 'within' ({site})"
                )
            entered.append(True)
            x = jnp.asarray(x)
            prompts = adapter(x.shape[-1])
            prompts = jnp.broadcast_to(prompts, x.shape[:axis] + prompts.shape).astype(x.dtype)
            head, tail = jnp.split(x, [at], axis=axis)
            return jnp.concatenate([head, prompts, tail], axis=axis)

        def at_output(call_, *a, **k):
            return insert(call_(*a, **k))

        def at_argument(call_, *a, **k):
            key = site.embeddings_argument
            if isinstance(key, str):
                return call_(*a, **{**k, key: insert(k[key])})
            return call_(*a[:key], insert(a[key]), *a[key + 1 :], **k)

        def ids_as(fill):
            # Position and type ids are (..., T), with or without a batch axis.
            def hook(call_, ids, *a, **k):
                ids = jnp.asarray(ids)
                return call_(fill(ids.shape[:-1] + (ids.shape[-1] + count,), ids.dtype), *a, **k)

            return hook

        def positions(shape, dtype):
            return jnp.broadcast_to(jnp.arange(shape[-1], dtype=dtype), shape)

        if self.position == "input":
            hooks = {inserted: at_output}
            hooks.update({p: ids_as(positions) for p in site.position_embeddings})
            hooks.update({p: ids_as(jnp.zeros) for p in site.token_type_embeddings})
        else:
            hooks = {inserted: at_output if site.embeddings_argument is None else at_argument}
        return run_hooked(site, hooks, call, args, kwargs, ctx, site.within)


def _padding_mask(mask: Any, count: int, at: int) -> jax.Array:
    """A ``(batch, keys)`` mask with entries for the prompts: every query attends to them."""
    return insert_ones(mask, count, at, (-1,))


def _attention_mask(mask: Any, count: int, at: int) -> jax.Array:
    """A ``(..., queries, keys)`` mask with the prompts as keys (every query attends to them) and as
    queries, which attend to every prompt and to the keys the first token attends to: for a padding
    mask that is every real token (as with a ``(batch, keys)`` mask); a causal mask stays causal for
    the real tokens, since every token may attend to the first."""
    mask = insert_ones(mask, count, at, (-1,))
    if mask.shape[-2] == 1:
        return mask
    rows = jnp.broadcast_to(mask[..., :1, :], mask.shape[:-2] + (count, mask.shape[-1]))
    head, tail = jnp.split(mask, [at], axis=-2)
    return jnp.concatenate([head, rows, tail], axis=-2)


@register_method("prompt_tuning")
@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(MethodConfig):
    """Prompt tuning with PEFT's field names; AdapterHub's names are accepted too.

    Attributes:
        num_virtual_tokens: the number of prompts P (AdapterHub: ``prompt_length``); default 20,
            10 with ``style='adapterhub'``.
        prompt_tuning_init: ``'RANDOM'`` (N(0, 1), PEFT's) or ``'random_uniform'`` (U(-0.5, 0.5),
            AdapterHub's; AdapterHub's field: ``prompt_init``); default by style. Initialising from
            text or the vocabulary needs a tokenizer: load such prompts as weights instead.
        style: ``'peft'`` (prompts before position and type embeddings; the real tokens' positions
            shift by P) or ``'adapterhub'`` (prompts after the finished embeddings). See
            :mod:`jadapters.adapters.prompt`.
        combine: ``'prefix'``, or ``'prefix_after_bos'`` (after the first token: AdapterHub's
            option, and visual prompt tuning's place after a ViT's class token).
        prompt_length / prompt_init: AdapterHub's names for the fields above.

    It places itself at the preset's ``embeddings`` site, whose module (the
    model, usually) holds the prompts.

    Example:
        >>> PromptTuningConfig(prompt_length=5, style="adapterhub").adapter()
        PromptTuning(
            # attributes
            length = 5
            init_weights = 'uniform'
            dtype = None
            param_dtype = float32
        )
    """

    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int | None = None
    prompt_tuning_init: str | None = None
    style: str = "peft"
    combine: str = "prefix"
    prompt_length: int | None = None
    prompt_init: str | None = None

    def __post_init__(self) -> None:
        check_options("prompt_tuning", [self.style], STYLES, "style")
        check_options("prompt_tuning", [self.combine], COMBINES, "combine")
        for name in ("prompt_tuning_init", "prompt_init"):
            value = getattr(self, name)
            if value is not None and value not in ("RANDOM", "random_uniform"):
                raise ValueError(f"{name} must be 'RANDOM' or 'random_uniform' (other inits need a tokenizer), got {value!r}")
        self.adapter()

    def adapter(self) -> PromptTuning:
        peft = self.style == "peft"
        length = resolve_alias("num_virtual_tokens", self.num_virtual_tokens, "prompt_length", self.prompt_length,
                          20 if peft else 10)
        init = resolve_alias("prompt_tuning_init", self.prompt_tuning_init, "prompt_init", self.prompt_init,
                        "RANDOM" if peft else "random_uniform")
        return PromptTuning(length=length, init_weights=PROMPT_INITS[init])

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> Placed:
        site = placement.site(EMBEDDINGS, self.method)
        position = "input" if self.style == "peft" else "embeddings"
        strategy = PrependPrompt(site, position, self.combine)
        return Placed((), tuple(where) if where is not None else (site.module,), self.adapter(), strategy)
