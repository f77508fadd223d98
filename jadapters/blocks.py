"""Adapters inside a transformer sub-block's residual connection, placed as AdapterHub places them.

A transformer sub-block (attention, cross-attention or feed-forward) ends in a
residual connection: with ``h`` the sub-layer's output after its dropout and
``x`` the sub-block's input, post-LN families (BERT) compute ``LN(h + x)``
with their own LayerNorm, pre-LN families (GPT-2, T5, ViT) ``h + x``.
AdapterHub's bottleneck adapters work *inside* that sum: they may apply the
block's pretrained LayerNorm before the adapter, after it, or both, and take
their own residual before or after it.

A :class:`ResidualBlock` (a preset's *site*) says where those pieces are in a
model: which modules hold the sub-block, which child computes ``h``, which
child is the LayerNorm, and where ``x`` comes from. :class:`InResidualBlock`
(a strategy) runs the adapter there, reaching into the block's children with
:meth:`jadapters.AdapterContext.intercept_children`, with AdapterHub's
``original_ln_before``, ``original_ln_after``, ``residual_before_ln`` and
``is_parallel``. Its result is exactly AdapterHub's, operation for operation:

* post-LN site (``layer_norm`` set): the LayerNorm's call is replaced by the
  whole computation;
* pre-LN site: ``h`` is replaced by ``out`` and the block adds ``x`` itself, as
  AdapterHub's ``post_forward`` does without a LayerNorm. With
  ``original_ln_after=False`` AdapterHub returns ``out`` without ``x``; the
  block adds ``x`` anyway, so ``out - x`` replaces ``h`` (equal to float
  rounding).

Without a LayerNorm, ``residual_before_ln="post_add"`` takes the residual after
``h + x`` (AdapterHub 1.3 leaves that case undefined: it fails).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from jadapters.context import AdapterContext
from jadapters.errors import AdapterError
from jadapters.naming import REGEX_PREFIX, normalize_targets, path_matches
from jadapters.registry import register_strategy
from jadapters.strategies import AdapterFn, Strategy

#: In a site's regex targets, the layer number (what ``leave_out`` counts).
LAYER = "{layer}"



def check_joining(original_ln_before: Any, original_ln_after: Any, residual_before_ln: Any, is_parallel: Any) -> None:
    """Raises ``ValueError`` unless the options of :class:`InResidualBlock` have valid values.

    Example:
        >>> check_joining(True, True, "pre_add", False)
        Traceback (most recent call last):
        ...
        ValueError: residual_before_ln must be True, False or 'post_add', got 'pre_add'
    """
    for name, value in (("original_ln_before", original_ln_before), ("original_ln_after", original_ln_after),
                        ("is_parallel", is_parallel)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not (isinstance(residual_before_ln, bool) or residual_before_ln == "post_add"):
        raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {residual_before_ln!r}")
    if residual_before_ln == "post_add" and not original_ln_before and not is_parallel:
        raise ValueError("residual_before_ln='post_add' takes the residual after original_ln_before's addition: "
                         "set original_ln_before=True")


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
    """Where a sub-block's ``h``, ``x`` and LayerNorm are: a preset's site for :class:`InResidualBlock`.

    Attributes:
        blocks: targets of the modules whose call holds the sub-block. In a
            regex target (``'re:...'``), ``{layer}`` stands for the layer
            number: methods with ``leave_out`` exclude layers through it.
        hidden: the child (path relative to the block) whose output is ``h``.
        hidden_index: the element of that child's output that is ``h``, when
            the child returns a tuple; None when it returns ``h``.
        layer_norm: the child LayerNorm the block applies to ``h + x``
            (post-LN); None when the block itself adds ``x`` to the child's
            output (pre-LN).
        residual: where ``x`` comes from: the block's positional argument
            (an int), or the child (a relative path) whose first argument is ``x``,
            which must run before ``hidden``.

    Example:
        >>> site = ResidualBlock(r"re:(.*/)?layer_{layer}/output_add", hidden="dropout", layer_norm="LayerNorm")
        >>> site.matches("encoder/layer_3/output_add"), site.targets(leave_out=(3,))
        (True, ('re:(.*/)?layer_(?!(?:3)(?!\\\\d))\\\\d+/output_add',))
    """

    blocks: tuple[str, ...]
    hidden: str
    hidden_index: int | None = None
    layer_norm: str | None = None
    residual: int | str = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", normalize_targets(self.blocks))
        if not self.blocks:
            raise ValueError("a ResidualBlock needs at least one block target")
        for target in self.blocks:
            if LAYER in target and not target.startswith(REGEX_PREFIX):
                raise ValueError(f"{LAYER} may appear only in regex targets ('re:...'), got {target!r}")
            normalize_targets(_substitute(target, r"\d+"))  # a bad regex fails here
        for name in ("hidden", "layer_norm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip("/")):
                raise ValueError(f"{name} must be a child's relative path, got {value!r}")
        residual = self.residual
        if isinstance(residual, bool) or not isinstance(residual, (int, str)) or residual == "" or (
            isinstance(residual, int) and residual < 0
        ):
            raise ValueError(f"residual must be the block's argument index (int >= 0) or a child's path, got {residual!r}")
        if self.hidden_index is not None and (isinstance(self.hidden_index, bool) or not isinstance(self.hidden_index, int)):
            raise ValueError(f"hidden_index must be an int or None, got {self.hidden_index!r}")

    @property
    def numbered(self) -> bool:
        """Whether every block target carries the layer number ``{layer}``."""
        return all(LAYER in target for target in self.blocks)

    def targets(self, leave_out: tuple[int, ...] = ()) -> tuple[str, ...]:
        """The block targets, without the layers in ``leave_out``."""
        if leave_out and not self.numbered:
            raise ValueError(
                f"leave_out needs the layer number in every block path, but the targets {list(self.blocks)} have "
                f"none ({LAYER}); layers inside nn.scan share one path and cannot be left out one by one"
            )
        number = r"\d+"
        if leave_out:
            number = rf"(?!(?:{'|'.join(str(int(i)) for i in sorted(set(leave_out)))})(?!\d))\d+"
        return tuple(_substitute(target, number) for target in self.blocks)

    def matches(self, path: str) -> bool:
        """Whether ``path`` is one of this site's blocks (any layer)."""
        return any(path_matches(path, target) for target in self.targets())


def _substitute(target: str, number: str) -> str:
    return target.replace(LAYER, number)


@register_strategy
@dataclasses.dataclass(frozen=True)
class InResidualBlock(Strategy):
    """Runs a bottleneck adapter inside a sub-block's residual connection, with AdapterHub's options.

    The adapter is called as ``adapter(inp, residual)`` and returns
    ``A(inp) + residual`` (``residual`` None: ``A(inp)`` alone), as
    :class:`jadapters.Bottleneck` does. With ``h``, ``x`` and ``LN`` as in
    :class:`ResidualBlock` (``LN`` absent on a pre-LN site):

    * sequential: ``residual = h`` if ``residual_before_ln is True``;
      ``inp = LN(h + x)`` if ``original_ln_before`` (``residual = h + x``
      first when ``residual_before_ln == "post_add"``), else ``inp = h``;
      ``residual = inp`` if ``residual_before_ln is False``;
      ``out = adapter(inp, residual)``;
    * parallel (``is_parallel``): ``out = adapter(x) + h``;
    * then ``LN(out + x)`` if ``original_ln_after``, else ``out``.

    ``sites`` are ``(name, ResidualBlock)`` pairs; each call uses the sites
    whose blocks match the intercepted path. Where one module holds several
    sites (GPT-2's block holds both its attention and its feed-forward), the
    adapter keeps separate variables per site, under the site's name.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import jadapters
        >>> class AddNorm(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, h, x):
        ...         return nn.LayerNorm(name="ln")(nn.Dropout(0.1, deterministic=True, name="drop")(h) + x)
        >>> site = ResidualBlock("", hidden="drop", layer_norm="ln", residual=1)
        >>> model = jadapters.with_adapters(AddNorm(), {"block": ""})
        >>> strategy = InResidualBlock((("ffn_block", site),), original_ln_before=True)
        >>> model = model.add_adapter("a", jadapters.Bottleneck(reduction_factor=2), strategy=strategy)
        >>> h, x = jnp.ones((1, 3, 4)), jnp.arange(12.0).reshape(1, 3, 4)
        >>> params = AddNorm().init(jax.random.key(0), h, x)
        >>> variables = jadapters.init_adapters(model, params, jax.random.key(1), h, x)
        >>> model.apply(variables, h, x).shape
        (1, 3, 4)
    """

    sites: tuple[tuple[str, ResidualBlock], ...] = ()
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    is_parallel: bool = False

    def validate(self) -> None:
        if not self.sites:
            raise ValueError("InResidualBlock needs at least one (name, ResidualBlock) site")
        for entry in self.sites:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], ResidualBlock)):
                raise ValueError(f"each site is a (name, ResidualBlock) pair, got {entry!r}")
        if len({name for name, _ in self.sites}) != len(self.sites):
            raise ValueError(f"site names must be unique, got {[name for name, _ in self.sites]}")
        check_joining(self.original_ln_before, self.original_ln_after, self.residual_before_ln, self.is_parallel)

    def around(self, adapter: AdapterFn, call: Callable[..., Any], ctx: AdapterContext) -> Any:
        def join(name: str, nested: bool, *args: Any) -> Any:
            return self.join(adapter.nested(name) if nested else adapter, *args)

        return self.run_sites(call, ctx, join)

    def run_sites(self, call: Callable[..., Any], ctx: AdapterContext, join: Callable[..., Any]) -> Any:
        """Runs the block with ``join(site_name, nested, h, x, layer_norm, layer_norm_again)`` at each site here.

        ``nested`` says whether the module holds several sites (variables per
        site); composition blocks pass their own ``join``.
        """
        here = [(name, site) for name, site in self.sites if site.matches(ctx.path)]
        if not here:
            raise AdapterError(
                f"{ctx.where()}: this module is none of the residual blocks the adapter works in "
                f"({', '.join(f'{name}: {list(site.blocks)}' for name, site in self.sites)}); place it on one of them"
            )
        hooks: dict[str, Callable[..., Any]] = {}
        states = []
        for name, site in here:
            states.append(self._hook(site, name, functools.partial(join, name, len(here) > 1), ctx, hooks))
        with ctx.intercept_children(hooks):
            output = call(*ctx.args, **ctx.kwargs)
        for (name, site), seen in zip(here, states):
            if not seen.get("joined"):
                child = site.layer_norm if "h" in seen else site.hidden
                raise AdapterError(
                    f"{ctx.where()} (site {name!r}): the block never called its child {child!r}, so the adapter "
                    f"did not run; check the site's hidden / layer_norm paths"
                )
        return output

    def _hook(self, site: ResidualBlock, name: str, join: Callable[..., Any], ctx: AdapterContext, hooks: dict) -> dict:
        """Adds the hooks of one site to ``hooks``; returns the state they fill."""
        seen: dict[str, Any] = {}

        def add(child: str, hook: Callable[..., Any]) -> None:
            if child in hooks:
                raise AdapterError(f"{ctx.where()}: two sites of this module use its child {child!r}")
            hooks[child] = hook

        def residual() -> Any:
            if isinstance(site.residual, int):
                return ctx.argument(site.residual)
            if "x" not in seen:
                raise AdapterError(
                    f"{ctx.where()} (site {name!r}): the child {site.residual!r} that gives the residual did not "
                    f"run before {site.hidden!r}"
                )
            return seen["x"]

        if isinstance(site.residual, str):
            def capture_input(run, x, *args, **kwargs):
                seen["x"] = x
                return run(x, *args, **kwargs)

            add(site.residual, capture_input)

        def hidden(run, *args, **kwargs):
            output = run(*args, **kwargs)
            h = output if site.hidden_index is None else output[site.hidden_index]
            _require_array(h, ctx, f"the output of {site.hidden!r}")
            if site.layer_norm is not None:
                seen["h"] = h
                return output
            new = join(h, residual(), None, None)
            seen["joined"] = True
            if site.hidden_index is None:
                return new
            return type(output)(new if i == site.hidden_index else o for i, o in enumerate(output))

        add(site.hidden, hidden)
        if site.layer_norm is not None:
            def layer_norm(run, value, *args, **kwargs):
                if "h" not in seen:
                    raise AdapterError(
                        f"{ctx.where()} (site {name!r}): the LayerNorm {site.layer_norm!r} ran before {site.hidden!r}"
                    )
                seen["joined"] = True
                norm = lambda v: run(v, *args, **kwargs)
                again = lambda v: run.again(v, *args, **kwargs)
                return join(seen.pop("h"), residual(), norm, again)

            add(site.layer_norm, layer_norm)
        return seen

    def join(
        self,
        adapter: AdapterFn,
        h: jax.Array,
        x: jax.Array,
        layer_norm: Callable[[Any], Any] | None,
        layer_norm_again: Callable[[Any], Any] | None = None,
    ) -> jax.Array:
        """AdapterHub's pre_forward, adapter and post_forward on ``h`` and ``x``.

        ``layer_norm`` is the block's own LayerNorm call (None on a pre-LN
        site), which runs once; ``layer_norm_again`` the same function on the
        same variables, for a LayerNorm applied both before and after the adapter.
        """
        cast = lambda v: v.astype(h.dtype)
        if self.is_parallel:
            out = cast(adapter(x, None)) + h
        else:
            residual = h if self.residual_before_ln is True else None
            inp = h
            if self.original_ln_before:
                inp = h + x
                if self.residual_before_ln == "post_add":
                    residual = inp
                if layer_norm is not None:
                    inp = (layer_norm_again or layer_norm)(inp) if self.original_ln_after else layer_norm(inp)
            if self.residual_before_ln is False:
                residual = inp
            out = cast(adapter(inp, residual))
        if layer_norm is None:
            # The block adds x to what replaces h.
            return out if self.original_ln_after else out - x
        return layer_norm(out + x) if self.original_ln_after else out


def _require_array(value: Any, ctx: AdapterContext, what: str) -> None:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise AdapterError(
            f"{ctx.where()}: {what} is a {type(value).__name__}, not an array; set the site's hidden_index "
            f"to the element that is the sub-layer's output"
        )
