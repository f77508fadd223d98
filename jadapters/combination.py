"""Weighted combinations of adapters: PEFT's ``add_weighted_adapter``, AdapterHub's ``average_adapter``.

Both return a new model and new variables holding one more, ordinary adapter,
built from existing ones; the sources and the variables passed in are left as
they were. The result saves (:func:`jadapters.save_adapters`), loads and merges
(:func:`jadapters.merge_adapters`) like any adapter of its kind.

* :func:`add_weighted_adapter` combines LoRA adapters with PEFT 0.21's
  semantics: ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` and
  ``magnitude_prune`` act on A and B separately (each weighted by
  ``sqrt(|w * scaling|)``, the sign on A), ``cat`` stacks the ranks exactly
  (``delta = sum_i w_i delta_i``), and ``svd`` (with ``ties_svd``,
  ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) factors the
  combined update ``sum_i w_i delta_i`` back to rank ``svd_rank``. The new LoRA
  has ``r = lora_alpha = new rank`` (scaling 1) and the first source's other
  options, rsLoRA included (as in PEFT, where that makes its scaling ``sqrt(r)``).
* :func:`average_adapter` averages adapters of one configuration with
  AdapterHub 1.3's semantics: every variable of a bottleneck, LoRA, prefix, ...
  (``linear``), LoRA with only B negated for negative weights
  (``lora_linear_only_negate_b``), or the LoRA updates factored by an SVD
  (``lora_delta_w_svd``).

The tensor functions of PEFT's ``merge_utils`` are here too (:func:`task_arithmetic`,
:func:`ties`, :func:`dare_linear`, ...), for arrays. DARE draws its masks from a
JAX key instead of torch's generator: the same maths, other random numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jadapters.adapters.lora import LoRA
from jadapters.errors import AdapterError
from jadapters.naming import normalize_targets
from jadapters.strategies import ParallelAdd
from jadapters.transform import AdaptedModule, AdapterSpec
from jadapters.tree import ADAPTERS_KEY, merge_trees, split_adapters

#: PEFT's combination types. The first five act on A and B separately and need equal ranks.
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTOR_TYPES + ("cat",) + SVD_TYPES
#: AdapterHub's ``combine_strategy`` values.
AVERAGE_STRATEGIES = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
MAJORITY_SIGN_METHODS = ("total", "frequency")

# A LoRA's two factors in jadapters' params: (A, B) leaf paths, Dense-like layers and Embeds.
_DENSE = (("lora_a", "kernel"), ("lora_b", "kernel"))
_EMBED = (("lora_embedding_a",), ("lora_embedding_b",))


# ---------------------------------------------------------------------------------- tensor maths


def magnitude_based_pruning(tensor: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density * size)`` entries of largest magnitude, zeroes the rest.

    Example:
        >>> magnitude_based_pruning(jnp.array([0.1, -3.0, 2.0, 0.5]), 0.5).tolist()
        [0.0, -3.0, 2.0, 0.0]
    """
    if density >= 1:
        return tensor
    flat = jnp.abs(tensor).reshape(-1)
    k = int(density * flat.size)
    if k == 0:
        return jnp.zeros_like(tensor)
    _, top = jax.lax.top_k(flat, k)
    return tensor * jnp.zeros(flat.shape, tensor.dtype).at[top].set(1).reshape(tensor.shape)


def random_pruning(tensor: jax.Array, density: float, key: jax.Array, rescale: bool = True) -> jax.Array:
    """Keeps each entry with probability ``density`` (a Bernoulli mask from ``key``), divided by
    ``density`` if ``rescale``; ``density >= 1`` keeps everything, unscaled (as PEFT)."""
    if density >= 1:
        return tensor
    kept = tensor * jax.random.bernoulli(key, density, tensor.shape).astype(tensor.dtype)
    return kept / density if rescale else kept


def majority_sign_mask(stacked: jax.Array, method: str = "total") -> jax.Array:
    """Where each task's sign (tasks on axis 0) agrees with the elected one: the sign of the
    sum (``"total"``) or of the count of signs (``"frequency"``), ties counting as positive."""
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == jnp.where(magnitude >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(weighted: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean over tasks (axis 0) of the entries the mask keeps (0 where none is kept)."""
    kept = mask.astype(weighted.dtype)
    return (weighted * kept).sum(0) / jnp.maximum(kept.sum(0), 1.0)


def _weighted(tensors: Sequence[jax.Array], weights: Sequence[float]) -> tuple[jax.Array, jax.Array]:
    stacked = jnp.stack(list(tensors))
    w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    return stacked, stacked * w


def task_arithmetic(tensors: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
    """``sum_i w_i t_i``.

    Example:
        >>> task_arithmetic([jnp.ones(2), jnp.full(2, 2.0)], [0.5, -1.0]).tolist()
        [-1.5, -1.5]
    """
    return _weighted(tensors, weights)[1].sum(0)


def magnitude_prune(tensors: Sequence[jax.Array], weights: Sequence[float], density: float) -> jax.Array:
    """Task arithmetic of the tensors pruned to their largest ``density`` fraction."""
    return task_arithmetic([magnitude_based_pruning(t, density) for t in tensors], weights)


def ties(tensors: Sequence[jax.Array], weights: Sequence[float], density: float,
         majority_sign_method: str = "total") -> jax.Array:
    """TIES: prune by magnitude, elect a sign per entry from the pruned (unweighted) tensors, and
    average the weighted entries that agree with it.

    Example:
        >>> ties([jnp.array([1.0, -2.0]), jnp.array([3.0, 1.0])], [1.0, 1.0], 1.0).tolist()
        [2.0, -2.0]
    """
    stacked, weighted = _weighted([magnitude_based_pruning(t, density) for t in tensors], weights)
    return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))


def dare_linear(tensors: Sequence[jax.Array], weights: Sequence[float], density: float,
                keys: Sequence[jax.Array]) -> jax.Array:
    """DARE: each tensor randomly pruned and rescaled (one key each), then task arithmetic."""
    return task_arithmetic([random_pruning(t, density, k) for t, k in zip(tensors, keys)], weights)


def dare_ties(tensors: Sequence[jax.Array], weights: Sequence[float], density: float, keys: Sequence[jax.Array],
              majority_sign_method: str = "total") -> jax.Array:
    """DARE's random pruning followed by TIES' sign election and disjoint merge."""
    stacked, weighted = _weighted([random_pruning(t, density, k) for t, k in zip(tensors, keys)], weights)
    return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))


def _mapped(fn, depth: int):
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


def _combine(how: str, tensors: list[jax.Array], weights: list[float], *, density, method, keys, depth) -> jax.Array:
    """PEFT's merge function ``how`` applied per layer (``depth`` leading axes stack the layers of
    an ``nn.scan``: magnitude pruning ranks each layer's entries on their own)."""
    if how == "linear":
        return task_arithmetic(tensors, weights)
    if how in ("ties", "magnitude_prune"):
        pruned = [_mapped(lambda t: magnitude_based_pruning(t, density), depth)(t) for t in tensors]
        if how == "magnitude_prune":
            return task_arithmetic(pruned, weights)
        return ties(pruned, weights, 1.0, method)  # already pruned, layer by layer
    if how == "dare_linear":
        return dare_linear(tensors, weights, density, keys)
    return dare_ties(tensors, weights, density, keys, method)


def dare_keys(seed: int, location: int, source: int, factor: int) -> jax.Array:
    """The key of DARE's mask for one source tensor: ``location`` is the index of the layer in the
    combined adapter's order, ``source`` the index in ``adapters``, ``factor`` 0 for A (or the
    update, for the ``*_svd`` types) and 1 for B."""
    key = jax.random.key(seed)
    for part in (location, source, factor):
        key = jax.random.fold_in(key, part)
    return key


# ---------------------------------------------------------------------------------- where the sources are


@dataclasses.dataclass(frozen=True)
class _Site:
    """One layer holding some of the sources: its path, and per present source (index, A, B, scaling)."""

    path: str
    leaves: tuple[tuple[str, ...], tuple[str, ...]]
    entries: tuple[tuple[int, jax.Array, jax.Array, float], ...]

    @property
    def depth(self) -> int:
        return self.entries[0][1].ndim - 2

    @property
    def is_conv(self) -> bool:
        # A Conv's B is a 1x1 convolution (..., 1, [1,] r, out) after a window of A (..., k, [k,] in, r);
        # a stack of Dense layers has its layer count there in both.
        a, b = self.entries[0][1], self.entries[0][2]
        return self.leaves == _DENSE and a.ndim >= 3 and b.shape[-3] == 1 and a.shape[-3] != 1


def _sub(tree: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _source_locations(params: Mapping[str, Any], name: str) -> dict[str, Mapping[str, Any]]:
    """Module path -> the adapter's params there (root-shared params excluded)."""
    found: dict[str, Mapping[str, Any]] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, sub in node.items():
            if not isinstance(sub, Mapping):
                continue
            if key == ADAPTERS_KEY:
                if name in sub:
                    found["/".join(path)] = sub[name]
            else:
                walk(sub, path + (key,))

    walk(params, ())
    return found


def _leaf_pair(p: Mapping[str, Any], name: str, path: str):
    for leaves in (_DENSE, _EMBED):
        a, b = _sub(p, leaves[0]), _sub(p, leaves[1])
        if a is not None and b is not None:
            return leaves, a, b
    raise AdapterError(f"adapter {name!r} at {path!r}: no LoRA factors (lora_a/lora_b or lora_embedding_a/_b) "
                       f"in its params, which hold {sorted(p)}")


def _sites(specs: Sequence[AdapterSpec], variables: Mapping[str, Any]) -> list[_Site]:
    params = variables.get("params", {})
    by_path: dict[str, list] = {}
    for index, spec in enumerate(specs):
        found = _source_locations(params, spec.name)
        if not found:
            raise AdapterError(f"adapter {spec.name!r} has no params in the variables given; initialise it first "
                               f"(jadapters.init_adapters)")
        for path, p in found.items():
            leaves, a, b = _leaf_pair(p, spec.name, path)
            rank, alpha = spec.adapter.rank_and_alpha(path)
            by_path.setdefault(path, []).append((leaves, (index, a, b, spec.adapter.scaling_for(rank, alpha))))
    sites = []
    for path, found in by_path.items():
        kinds = {leaves for leaves, _ in found}
        if len(kinds) > 1:
            raise AdapterError(f"the adapters at {path!r} mix embedding and linear LoRA factors")
        sites.append(_Site(path, kinds.pop(), tuple(entry for _, entry in found)))
    return sites


def _check_sources(adapted: Any, variables: Any, adapters: Sequence[str], adapter_name: str, what: str
                   ) -> list[AdapterSpec]:
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"{what} expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise AdapterError(f"{what} expects variables with a 'params' collection")
    if isinstance(adapters, str) or not adapters:
        raise AdapterError(f"{what}: give the adapters to combine as a non-empty list of names, got {adapters!r}")
    if not isinstance(adapter_name, str) or not adapter_name or ":" in adapter_name:
        raise AdapterError(f"{what}: the new adapter's name must be a bare, non-empty name, got {adapter_name!r}")
    if adapter_name in adapted.adapter_names():
        raise AdapterError(f"{what}: adapter {adapter_name!r} already exists; the model has {adapted.adapter_names()}")
    specs = []
    for name in adapters:
        spec = next((s for s in adapted.adapters if s.name == name), None)
        if spec is None:
            raise AdapterError(f"{what}: unknown adapter {name!r}; the model has {adapted.adapter_names()}")
        specs.append(spec)
    return specs


def _check_weights(weights: Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(weights, (str, bytes)) or len(weights) != n:
        raise AdapterError(f"{what}: expected {n} weights, one per adapter, got {weights!r}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise AdapterError(f"{what}: weights must be finite numbers, got {weights!r}")
    return [float(w) for w in weights]


def _check_plain_lora(spec: AdapterSpec, what: str) -> LoRA:
    lora = spec.adapter
    if not isinstance(lora, LoRA):
        raise AdapterError(f"{what} combines LoRA adapters; {spec.name!r} is a {type(lora).__name__}")
    if not isinstance(spec.strategy, ParallelAdd) or spec.strategy.input_index != 0:
        raise AdapterError(f"{what}: LoRA {spec.name!r} must use its ParallelAdd strategy, got {spec.strategy!r}")
    if lora.use_dora or lora.bias != "none" or lora.lora_bias or lora.rewrites_base:
        raise AdapterError(
            f"{what}: LoRA {spec.name!r} is not a plain LoRA (use_dora={lora.use_dora}, bias={lora.bias!r}, "
            f"lora_bias={lora.lora_bias}, init_weights={lora.init_weights!r}); only its A and B can be combined "
            f"(convert PiSSA/OLoRA with residual_to_lora first)"
        )
    return lora


def _max_rank(lora: LoRA) -> int:
    return max([lora.rank] + [r for _, r in lora.rank_pattern])


def _pad_rank(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """A ``(..., in, r)`` and B ``(..., r, out)`` padded with zeros to ``rank`` (B A unchanged)."""
    missing = rank - a.shape[-1]
    if missing <= 0:
        return a, b
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, missing)])
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, missing), (0, 0)])
    return a, b


def _new_variables(variables: Mapping[str, Any], name: str, arrays: Mapping[str, tuple]) -> dict:
    flat = {}
    for path, (leaves, a, b) in arrays.items():
        at = ("params",) + tuple(path.split("/") if path else ()) + (ADAPTERS_KEY, name)
        flat[at + leaves[0]], flat[at + leaves[1]] = a, b
    return merge_trees(variables, traverse_util.unflatten_dict(flat))


# ---------------------------------------------------------------------------------- PEFT


def add_weighted_adapter(
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> tuple[AdaptedModule, dict]:
    """A new LoRA adapter combining LoRA ``adapters`` with ``weights``: PEFT's ``add_weighted_adapter``.

    Args:
        adapted: the model holding the sources (plain LoRA adapters: no DoRA, no biases).
        variables: its variables.
        adapters: the names of the sources (at least one; with one, the type is ``linear``).
        weights: one per source; negative weights subtract.
        adapter_name: the new adapter's name (must be new).
        combination_type: ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
            (act on A and B separately: the sources must have the same rank), ``cat`` (exact:
            the ranks add up), or ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
            ``magnitude_prune_svd`` (combine the updates, then keep the top ``svd_rank``).
        svd_rank: the rank of an SVD combination (default: the largest source rank).
        svd_clamp: a quantile in [0, 1]: the SVD factors' entries are clamped to +- that
            quantile of their values (PEFT's ``svd_clamp``).
        svd_full_matrices: PEFT's flag (torch's and JAX's ``full_matrices``); the truncated
            product does not depend on it, the factors' signs may.
        density: the fraction kept by ``ties``, ``dare_*`` and ``magnitude_prune*``, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` types.
        seed: the seed of DARE's random masks (see :func:`dare_keys`).

    Returns:
        ``(adapted, variables)`` with the new adapter (enabled; the sources keep their flags), on
        every layer that holds a source. ``rank = alpha = `` the new rank: ``linear``-type ranks
        are the sources' rank, ``cat``'s their sum; the other options (dropout, rsLoRA, dtypes)
        are the first source's, as PEFT copies its config.

    Raises:
        AdapterError: for an unknown or non-LoRA source, an existing ``adapter_name``, unequal
            ranks where they must match, a bad ``density``, ``svd_rank`` or weight; before anything.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
        >>> base, x = nn.Dense(4), jnp.ones((2, 4))
        >>> adapted = jadapters.with_adapters(base, {"dense": ""})
        >>> for name in ("a", "b"):
        ...     adapted = adapted.add_adapter(name, jadapters.LoRA(rank=2, init_weights="random"))
        >>> variables = jadapters.init_adapters(adapted, base.init(jax.random.key(0), x), jax.random.key(1), x)
        >>> new, v = add_weighted_adapter(adapted, variables, ["a", "b"], [1.0, -0.5], "ab", "cat")
        >>> new.get_adapter("ab").adapter.rank
        4
        >>> only = lambda m, n: m.set_enabled_adapters(enabled=False).set_enabled_adapters(n)
        >>> y = lambda n: only(new, n).apply(v, x) - base.apply(variables, x)
        >>> bool(jnp.allclose(y("ab"), y("a") - 0.5 * y("b"), atol=1e-5))
        True
    """
    what = "add_weighted_adapter"
    specs = _check_sources(adapted, variables, adapters, adapter_name, what)
    weights = _check_weights(weights, len(specs), what)
    if combination_type not in COMBINATION_TYPES:
        raise AdapterError(f"{what}: combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    loras = [_check_plain_lora(s, what) for s in specs]
    if len(specs) == 1:
        combination_type = "linear"  # as PEFT
    how = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
    if how != "linear" and how != "cat":
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise AdapterError(f"{what}: combination_type {combination_type!r} needs density in (0, 1], "
                               f"got {density!r}")
    if "ties" in how and majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise AdapterError(f"{what}: majority_sign_method must be one of {MAJORITY_SIGN_METHODS}, "
                           f"got {majority_sign_method!r}")
    ranks = [_max_rank(lora) for lora in loras]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise AdapterError(
                f"{what}: combination_type {combination_type!r} combines A and B separately, so all adapters need "
                f"the same rank; got {dict(zip(adapters, ranks))} (use 'cat' or 'svd')"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise AdapterError(f"{what}: svd_rank must be a positive int, got {svd_rank!r}")
        new_rank = svd_rank or max(ranks)
    if svd_clamp is not None and not (isinstance(svd_clamp, numbers.Real) and 0 <= svd_clamp <= 1):
        raise AdapterError(f"{what}: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")

    sites = _sites(specs, variables)
    arrays = {}
    kind = "cat" if combination_type == "cat" else "factors" if combination_type in FACTOR_TYPES else "svd"
    for location, site in enumerate(sites):  # every check first: nothing is computed if one fails
        if site.is_conv and (kind == "svd" or how in ("ties", "magnitude_prune")):
            raise AdapterError(f"{what}: combination_type {combination_type!r} at the Conv at {site.path!r} is not "
                               f"supported (use 'cat', 'linear', 'dare_linear' or 'dare_ties')")
        if kind == "factors" and len({e[1].shape for e in site.entries}) != 1:
            raise AdapterError(
                f"{what}: at {site.path!r} the adapters have ranks "
                f"{ {adapters[e[0]]: e[1].shape[-1] for e in site.entries} } (rank_pattern), which "
                f"{combination_type!r} cannot combine factor by factor")
        if kind == "svd":
            _check_svd_rank(site, new_rank, what)
    for location, site in enumerate(sites):
        a_list, b_list = [e[1] for e in site.entries], [e[2] for e in site.entries]
        scaled = [weights[e[0]] * e[3] for e in site.entries]
        dare = how.startswith("dare")
        keys = [[dare_keys(seed, location, e[0], factor) for e in site.entries] if dare else None for factor in (0, 1)]
        if kind == "cat":
            wa, wb = scaled, [1.0] * len(scaled)
        elif kind == "factors":  # the sign goes on A only
            wb = [math.sqrt(abs(w)) for w in scaled]
            wa = [r if w >= 0 else -r for r, w in zip(wb, scaled)]
        else:
            wa, wb = [weights[e[0]] for e in site.entries], [e[3] for e in site.entries]
        a, b = _site_factors(a_list, b_list, jnp.asarray(wa, jnp.float32), jnp.asarray(wb, jnp.float32), *keys,
                             kind=kind, how=how, rank=new_rank, density=density, method=majority_sign_method,
                             clamp=svd_clamp, full_matrices=bool(svd_full_matrices), depth=site.depth)
        arrays[site.path] = (site.leaves, a, b)

    first = loras[0]
    lora = first.clone(rank=new_rank, alpha=float(new_rank), rank_pattern=(), alpha_pattern=(),
                       init_weights="default")
    spec = AdapterSpec(adapter_name, (), normalize_targets([s.path for s in sites]), lora, ParallelAdd(),
                       True, _lora_config(lora, [s.path for s in sites]))
    return adapted.add_spec(spec), _new_variables(variables, adapter_name, arrays)


def _lora_config(lora: LoRA, paths: list[str]) -> Any:
    from jadapters.adapters.lora import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=tuple(paths), lora_dropout=lora.dropout,
                      use_rslora=lora.use_rslora)


def _delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """``A B`` of Flax-layout factors: the update ``(..., in, out)`` in float32."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def _check_svd_rank(site: _Site, rank: int, what: str) -> None:
    n_in, n_out = site.entries[0][1].shape[-2], site.entries[0][2].shape[-1]
    if rank > min(n_in, n_out):
        raise AdapterError(f"{what}: the SVD rank {rank} exceeds the layer at {site.path!r} ({n_in} in, "
                           f"{n_out} out)")


@functools.partial(jax.jit, static_argnames=("kind", "how", "rank", "density", "method", "clamp", "full_matrices",
                                             "depth"))
def _site_factors(a_list, b_list, wa, wb, keys_a, keys_b, *, kind, how, rank, density, method, clamp,
                  full_matrices, depth) -> tuple[jax.Array, jax.Array]:
    """The new A and B at one layer (one compiled program per layer shape).

    ``cat``: A_i scaled by ``wa``, ranks stacked. ``factors``: A and B combined separately with
    ``wa`` / ``wb``. ``svd``: the updates ``wb_i A_i B_i`` combined with ``wa``, then factored.
    """
    dtype = a_list[0].dtype
    options = dict(density=density, method=method, depth=depth)
    if kind == "cat":
        a = jnp.concatenate([x.astype(jnp.float32) * w for x, w in zip(a_list, wa)], axis=-1)
        b = jnp.concatenate(b_list, axis=-2)
    elif kind == "factors":
        a = _combine(how, [x.astype(jnp.float32) for x in a_list], wa, keys=keys_a, **options)
        b = _combine(how, [x.astype(jnp.float32) for x in b_list], wb, keys=keys_b, **options)
    else:
        deltas = [s * _delta(x, y) for x, y, s in zip(a_list, b_list, wb)]
        combined = _combine(how, deltas, wa, keys=keys_a, **options)
        # torch's (out, in) orientation, as PEFT decomposes it (U takes the singular values).
        u, sv, vh = jnp.linalg.svd(jnp.swapaxes(combined, -1, -2), full_matrices=full_matrices)
        u, vh = u[..., :rank] * sv[..., None, :rank], vh[..., :rank, :]
        if clamp is not None:
            def clamped(u, vh):
                high = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
                return jnp.clip(u, -high, high), jnp.clip(vh, -high, high)

            u, vh = _mapped(clamped, depth)(u, vh)
        a, b = jnp.swapaxes(vh, -1, -2), jnp.swapaxes(u, -1, -2)
    return _pad_rank(a.astype(dtype), b.astype(dtype), rank)


# ---------------------------------------------------------------------------------- AdapterHub


def _comparable(adapter: Any) -> dict:
    """An adapter's fields, less those AdapterHub ignores when averaging (dropout, init)."""
    skip = {"parent", "name", "dropout", "init_weights"}
    return {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter) if f.name not in skip}


def average_adapter(
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    adapter_name: str,
    adapter_list: Sequence[str] | Mapping[str, float],
    weights: Sequence[float] | None = None,
    normalize_weights: bool = True,
    combine_strategy: str = "linear",
    svd_rank: int | None = None,
) -> tuple[AdaptedModule, dict]:
    """A new adapter averaging adapters of one configuration: AdapterHub's ``average_adapter``.

    Args:
        adapted: the model holding the adapters.
        variables: its variables.
        adapter_name: the new adapter's name (must be new).
        adapter_list: the names, or ``{name: weight}`` (then ``weights`` must be None).
        weights: one per adapter; None: equal weights ``1/n``.
        normalize_weights: divide the weights by their sum (when given).
        combine_strategy: ``"linear"``: every variable of the adapters (bottlenecks, LoRA, prompts,
            prefixes, ...) is ``sum_i w_i v_i``; ``"lora_linear_only_negate_b"``: LoRA's A
            weighted by ``|w_i|``, B by ``w_i``; ``"lora_delta_w_svd"``: the LoRA updates
            ``sum_i w_i B_i A_i`` (unscaled) factored to rank ``svd_rank`` by an SVD, in a LoRA of
            rank ``svd_rank`` and the sources' alpha (so its scaling is ``alpha / svd_rank``).
        svd_rank: the rank for ``"lora_delta_w_svd"`` (required there).

    Returns:
        ``(adapted, variables)`` with the new adapter, a copy of the first source's placement,
        strategy and enabled flag.

    Raises:
        AdapterError: for unknown names, adapters of different configurations (dropout and
            init aside, as AdapterHub), a LoRA strategy on other adapters, a missing ``svd_rank``,
            weights summing to zero, an existing ``adapter_name``; before anything changes.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
        >>> base, x = nn.Dense(4), jnp.ones((2, 4))
        >>> adapted = jadapters.with_adapters(base, {"dense": ""})
        >>> for name in ("a", "b"):
        ...     adapted = adapted.add_adapter(name, jadapters.LinearAdapter(dim=2))
        >>> variables = jadapters.init_adapters(adapted, base.init(jax.random.key(0), x), jax.random.key(1), x)
        >>> new, v = average_adapter(adapted, variables, "avg", ["a", "b"], weights=[3.0, 1.0])
        >>> p = lambda n: v["params"]["__adapters__"][n]["norm"]["scale"]
        >>> bool(jnp.allclose(p("avg"), 0.75 * p("a") + 0.25 * p("b")))
        True
    """
    what = "average_adapter"
    if isinstance(adapter_list, Mapping):
        if weights is not None:
            raise AdapterError(f"{what}: give weights either in adapter_list (a dict) or as weights=, not both")
        adapter_list, weights = list(adapter_list), list(adapter_list.values())
    specs = _check_sources(adapted, variables, list(adapter_list), adapter_name, what)
    if combine_strategy not in AVERAGE_STRATEGIES:
        raise AdapterError(f"{what}: combine_strategy must be one of {AVERAGE_STRATEGIES}, got {combine_strategy!r}")
    first = specs[0]
    for spec in specs[1:]:
        if (type(spec.adapter) is not type(first.adapter) or _comparable(spec.adapter) != _comparable(first.adapter)
                or spec.strategy != first.strategy or spec.targets != first.targets):
            raise AdapterError(
                f"{what}: cannot average adapters with different configurations: {first.name!r} is "
                f"{first.adapter!r} at {list(first.targets)}, {spec.name!r} is {spec.adapter!r} at {list(spec.targets)}"
            )
    if weights is None:
        weights = [1.0 / len(specs)] * len(specs)
    else:
        weights = _check_weights(weights, len(specs), what)
        total = sum(weights) if normalize_weights else 1.0
        if total == 0:
            raise AdapterError(f"{what}: the weights {weights} sum to zero and cannot be normalised "
                               f"(normalize_weights=False keeps them as they are)")
        weights = [w / total for w in weights]
    is_lora = isinstance(first.adapter, LoRA)
    if combine_strategy != "linear" and not is_lora:
        raise AdapterError(f"{what}: combine_strategy {combine_strategy!r} is for LoRA adapters; "
                           f"{first.name!r} is a {type(first.adapter).__name__}")
    if combine_strategy == "lora_delta_w_svd":
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise AdapterError(f"{what}: svd_rank (a positive int) must be set when using 'lora_delta_w_svd', "
                               f"got {svd_rank!r}")
    elif svd_rank is not None:
        if is_lora:
            raise AdapterError(f"{what}: svd_rank is only used by combine_strategy 'lora_delta_w_svd' "
                               f"(AdapterHub fails on it with {combine_strategy!r})")
        warnings.warn(f"{what}: svd_rank applies to LoRA adapters only; ignored", stacklevel=2)
    if is_lora and combine_strategy != "linear":
        _check_plain_lora(first, what)

    spec = dataclasses.replace(first, name=adapter_name)
    if combine_strategy == "lora_delta_w_svd":
        arrays = {}
        for site in _sites(specs, variables):
            if len(site.entries) != len(specs):
                raise AdapterError(f"{what}: not every adapter is at {site.path!r}")
            if site.is_conv:
                raise AdapterError(f"{what}: 'lora_delta_w_svd' at the Conv at {site.path!r} is not supported")
            _check_svd_rank(site, svd_rank, what)
            ordered = site.entries
            a, b = _site_factors([e[1] for e in ordered], [e[2] for e in ordered], jnp.asarray(weights, jnp.float32),
                                 jnp.ones(len(ordered), jnp.float32), None, None, kind="svd", how="linear",
                                 rank=svd_rank, density=None, method="total", clamp=None, full_matrices=True,
                                 depth=site.depth)
            arrays[site.path] = (site.leaves, a, b)
        lora = first.adapter.clone(rank=svd_rank, rank_pattern=())
        config = spec.config
        if config is not None and dataclasses.is_dataclass(config) and hasattr(config, "r"):
            config = dataclasses.replace(config, r=svd_rank)
        spec = dataclasses.replace(spec, adapter=lora, config=config)
        return adapted.add_spec(spec), _new_variables(variables, adapter_name, arrays)

    sources = [split_adapters(variables, [s.name])[0] for s in specs]
    flats = [traverse_util.flatten_dict(_renamed(tree, s.name, adapter_name)) for tree, s in zip(sources, specs)]
    if any(set(f) != set(flats[0]) or any(f[k].shape != flats[0][k].shape for k in f) for f in flats[1:]):
        raise AdapterError(f"{what}: the adapters' variables differ in names or shapes: "
                           f"{[s.name for s in specs]}")
    averaged = {}
    for key, leaf in flats[0].items():
        factors = weights
        if combine_strategy == "lora_linear_only_negate_b":
            factors = [abs(w) for w in weights] if _factor_of(key) == "a" else weights
        averaged[key] = sum(w * f[key].astype(jnp.float32) for w, f in zip(factors, flats)).astype(leaf.dtype)
    return adapted.add_spec(spec), merge_trees(variables, traverse_util.unflatten_dict(averaged))


def _factor_of(key: tuple[str, ...]) -> str:
    at = key.index(ADAPTERS_KEY) + 2
    leaf = key[at]
    if leaf in ("lora_a", "lora_embedding_a"):
        return "a"
    if leaf in ("lora_b", "lora_embedding_b"):
        return "b"
    raise AdapterError(f"average_adapter: 'lora_linear_only_negate_b' weighs only LoRA's A and B, "
                       f"not {'/'.join(key)}")


def _renamed(tree: Mapping[str, Any], old: str, new: str) -> dict:
    out = {}
    for key, sub in tree.items():
        if key == ADAPTERS_KEY:
            out[key] = {new: sub[old]}
        elif isinstance(sub, Mapping):
            out[key] = _renamed(sub, old, new)
        else:
            out[key] = sub
    return out
