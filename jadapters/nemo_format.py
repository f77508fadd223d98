"""NeMo's adapter files in: ``save_adapters``' file and the adapters inside a ``.nemo`` archive.

:func:`load_nemo_adapters` reads either file onto a Flax model, holding NeMo's
``LinearAdapter`` and ``MultiHeadAttentionAdapter`` (jadapters has both, with NeMo's
maths). :func:`load_nemo_state_dict` does the same from arrays already in memory and
needs no torch; :func:`load_nemo_adapters` needs torch to read NeMo's torch files
(``pip install 'jadapters[nemo]'``).

The two files:

* ``model.save_adapters(path)`` writes ``torch.save({qualified name: [state dict, ...],
  "__cfg__": model.cfg.adapters})``. The qualified name is ``'module:name'``, or the bare
  name of a global adapter; each state dict holds one module's tensors, keyed
  ``<name>.<param>``, in the order of ``model.modules()``; the file does not say which
  modules those are. ``__cfg__`` is an omegaconf ``DictConfig``: one entry per adapter
  (``_target_``, its arguments, ``adapter_strategy``, ``enabled``) and
  ``global_cfg.adapter_meta_cfg.modules`` (adapter name -> module name, ``''`` global).
* A ``.nemo`` archive is a tar (gzipped before NeMo 1.7) holding ``model_config.yaml`` (the
  model's config; ``adapters`` is the same as ``__cfg__``) and ``model_weights.ckpt``, the
  whole model's state dict, where an adapter's tensors are
  ``<module>.adapter_layer.<name>.<param>``: its modules are named.

The name rule: NeMo's module ``encoder.layers.3`` is the Flax path ``encoder/layers_3``
(``.`` becomes ``/``, and a list index joins its list's name with ``_``, as Flax names the
submodules of a list attribute); where the model has no such module but has
``encoder/layers/3`` (Hugging Face's style), that one. A model named otherwise passes
``module_map``: ``fn(nemo_module) -> flax_path`` or a dict ``{nemo_module: flax_path}``.

A ``.nemo`` archive's adapters go exactly on the modules it names. ``save_adapters``' file
names none: its adapters are added by their qualified names to an adapted model whose
module names are NeMo's (``targets={"encoder": "encoder/layers_*", ...}``, or an
:class:`jadapters.AdaptedModule` declaring them), and its i-th state dict fills the i-th
module the adapter lands on, in the order the model calls them (NeMo's ``modules()`` order
for a model that calls its modules in the order it defines them).

Layers inside ``nn.scan`` hold one stacked adapter: NeMo modules that map to one Flax path
(``module_map``), or a ``save_adapters`` adapter that lands on one scanned path, fill it
stacked in NeMo's module order.

The params: NeMo's Linear weights ``(out, in)`` become Flax kernels ``(in, out)``, a
LayerNorm's ``weight`` its ``scale``, biases stay biases.

* LinearAdapter, ``norm_position='pre'``: ``module.0`` (LayerNorm) -> ``norm``,
  ``module.1`` -> ``down``, ``module.3`` -> ``up`` (``module.2`` is the activation);
* ``'post'``: ``module.0`` -> ``down``, ``module.2`` -> ``up``, ``module.3`` -> ``norm``;
* MultiHeadAttentionAdapter: ``linear_q``, ``linear_k``, ``linear_v``, ``linear_out`` and
  ``pre_norm`` keep their names.

Reading torch files safely: ``torch.load(..., weights_only=True)`` only. ``__cfg__`` is a
pickled ``DictConfig``, which that refuses; instead of allowing omegaconf's classes (whose
code would then run on the file's data), the pickle's globals are listed first and only
omegaconf's config classes, NeMo's config dataclasses (which appear as type metadata),
``typing`` names, ``collections.defaultdict`` and builtin types are admitted, each replaced
by an inert placeholder that records what it was given; the config is then rebuilt from
those records as plain dicts and lists. Any other global refuses the file, naming it.
omegaconf itself is not needed.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import posixpath
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import yaml
from flax import traverse_util

from jadapters.adapters.attention import MultiHeadAttentionAdapter
from jadapters.adapters.linear import LinearAdapter
from jadapters.discovery import list_modules
from jadapters.errors import AdapterError
from jadapters.interop import ModuleMap, fill_params, has_module
from jadapters.strategies import MHAResidualAdd, ResidualAdd, ReturnResult, Strategy
from jadapters.transform import AdaptedModule, init_adapters, with_adapters
from jadapters.tree import ADAPTERS_KEY, merge_trees, split_adapters

__all__ = ["load_nemo_adapters", "load_nemo_state_dict", "nemo_to_flax", "read_nemo_file"]

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
ADAPTER_LAYER = ".adapter_layer."
GLOBAL_CFG = "global_cfg"

_LINEAR = {
    "pre": {"module.0.weight": ("norm", "scale"), "module.0.bias": ("norm", "bias"),
            "module.1.weight": ("down", "kernel"), "module.3.weight": ("up", "kernel")},
    "post": {"module.0.weight": ("down", "kernel"), "module.2.weight": ("up", "kernel"),
             "module.3.weight": ("norm", "scale"), "module.3.bias": ("norm", "bias")},
}
_MHA = {f"{layer}.{p}": (layer, "kernel" if p == "weight" else "bias")
        for layer in ("linear_q", "linear_k", "linear_v", "linear_out") for p in ("weight", "bias")}
_MHA.update({"pre_norm.weight": ("pre_norm", "scale"), "pre_norm.bias": ("pre_norm", "bias")})

#: The torch-file globals admitted as inert placeholders (besides torch's own tensor machinery).
_ADMITTED = re.compile(r"^(omegaconf|nemo)\.[\w.]+$|^typing\.\w+$|^collections\.defaultdict$"
                       r"|^(builtins|__builtin__)\.(dict|list|tuple|bool|int|long|float|str|unicode|bytes|object)$")

# ---------------------------------------------------------------------------------------------- the name rule


def nemo_to_flax(module_map: ModuleMap, params: Mapping[str, Any] | None = None) -> Callable[[str], str]:
    """``fn(NeMo module name) -> Flax path``: ``module_map``, else the name rule of the module docstring.

    Example:
        >>> nemo_to_flax(None)("encoder.layers.3")
        'encoder/layers_3'
        >>> nemo_to_flax(None, {"encoder": {"layers": {"3": {}}}})("encoder.layers.3")
        'encoder/layers/3'
        >>> nemo_to_flax({"encoder.layers.3": "blocks/3"})("encoder.layers.3")
        'blocks/3'
    """
    def rule(name: str) -> str:
        flax_style = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")
        plain = name.replace(".", "/")
        if params is not None and not has_module(params, flax_style) and has_module(params, plain):
            return plain
        return flax_style

    if module_map is None:
        return rule
    if isinstance(module_map, Mapping):
        return lambda name: module_map.get(name, rule(name))
    return module_map


# ---------------------------------------------------------------------------------------------- arrays in


def load_nemo_state_dict(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    model: Any,
    variables: Mapping[str, Any],
    *inputs: Any,
    name: str | Sequence[str] | None = None,
    targets: Mapping[str, Any] | None = None,
    global_modules: Sequence[str] | None = None,
    module_map: ModuleMap = None,
    mask_argument: int | str | None = None,
    source: str = "state dict",
    **kwargs: Any,
) -> tuple[AdaptedModule, dict]:
    """Loads NeMo adapters from arrays in memory onto a Flax model; no torch needed.

    Args:
        state: either ``save_adapters``' layout, ``{qualified name: [{'<name>.<param>':
            array}, ...]}``, or a model state dict ``{'<module>.adapter_layer.<name>.<param>':
            array}`` (other keys are ignored). Arrays in torch's layout (numpy or anything
            ``np.asarray`` takes).
        config: NeMo's adapters config as plain dicts (``__cfg__``, or ``model_config.yaml``'s
            ``adapters``).
        model: a plain Flax model or an :class:`jadapters.AdaptedModule` (its other adapters stay).
        variables: the model's variables, ``{'params': ...}``; unchanged.
        *inputs: sample inputs, as for :func:`jadapters.init_adapters` (``**kwargs`` too).
        name: the adapter(s) to load, bare or qualified; None: all.
        targets: for ``save_adapters``' layout and a plain model, NeMo's module names -> Flax
            targets (``with_adapters``' argument), e.g. ``{"encoder": "encoder/layers_*"}``.
        global_modules: where global adapters go (NeMo's default module); default
            ``["encoder"]`` when ``targets`` declares it, else all declared modules.
        module_map: NeMo module name -> Flax path, for a model state dict (see the module docstring).
        mask_argument: the hooked module's argument holding the attention mask
            (:class:`jadapters.MHAResidualAdd`), for MHA adapters; None: no mask.
        source: what to call the arrays in error messages.

    Returns:
        ``(adapted, variables)`` with the adapters under their bare names, enabled as saved.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jadapters
        >>> class Block(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(4, name="fc")(x)
        >>> class Model(nn.Module):
        ...     def setup(self):
        ...         self.layers = [Block(), Block()]
        ...     def __call__(self, x):
        ...         return self.layers[1](self.layers[0](x))
        >>> x = jnp.ones((2, 4))
        >>> params = Model().init(jax.random.key(0), x)
        >>> config = {"a": {"_target_": "nemo.collections.common.parts.adapter_modules.LinearAdapter",
        ...                 "in_features": 4, "dim": 2, "norm_position": "pre"}}
        >>> rng = np.random.default_rng(0)
        >>> shapes = {"module.0.weight": (4,), "module.0.bias": (4,), "module.1.weight": (2, 4),
        ...           "module.3.weight": (4, 2)}
        >>> state = {f"layers.1.adapter_layer.a.{k}": rng.normal(size=s) for k, s in shapes.items()}
        >>> adapted, new = jadapters.load_nemo_state_dict(state, config, Model(), params, x)
        >>> adapted.get_adapter("a").targets
        ('layers_1',)
        >>> bool(jnp.allclose(adapted.apply(new, x), Model().apply(params, x)))
        False
    """
    adapters, modules_of = _read_config(config, source)
    listed = any(isinstance(v, (list, tuple)) for v in state.values())
    chosen = _chosen(adapters, name, state if listed else None, source)
    if listed:
        adapted, specs = _placed_by_names(state, chosen, adapters, modules_of, model, targets, global_modules,
                                          mask_argument, source)
    else:
        params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
        adapted, specs = _placed_by_state_dict(state, chosen, adapters, model, params, module_map, mask_argument,
                                               source)
    # Only the shapes of the adapters' params are needed: every one of them comes from the file.
    created = jax.eval_shape(lambda v: init_adapters(adapted, v, jax.random.key(0), *inputs, **kwargs), variables)
    new, _ = split_adapters(created, [bare for bare, _ in specs])
    order = list_modules(adapted, variables, *inputs, **kwargs).paths if listed else None
    filled = []
    for bare, per_module in specs:
        ours, _ = split_adapters(new, [bare])
        wanted = _wanted(bare, adapters[bare], ours, per_module, order, source)
        filled.append(fill_params(Path(source), ours, wanted, bare, f"NeMo's {_kind(adapters[bare])}"))
    return adapted, merge_trees(variables, *filled)


def _read_config(config: Mapping[str, Any], source: str) -> tuple[dict, dict]:
    if not isinstance(config, Mapping):
        raise AdapterError(f"{source}: expected NeMo's adapters config (a mapping), got {type(config).__name__}")
    adapters = {k: v for k, v in config.items() if k != GLOBAL_CFG}
    for bare, cfg in adapters.items():
        if not isinstance(cfg, Mapping):
            raise AdapterError(f"{source}: adapter {bare!r}: expected its config (a mapping), got {cfg!r}")
    meta = (config.get(GLOBAL_CFG) or {}).get("adapter_meta_cfg") or {}
    return adapters, dict(meta.get("modules") or {})


def _chosen(adapters: dict, name: Any, listed: Mapping | None, source: str) -> list[str]:
    """The bare names to load, in the file's order."""
    available = list(adapters)
    if listed is not None:  # save_adapters' keys: 'module:name' or 'name'
        available = []
        for key in listed:
            bare = key.split(":", 1)[-1]
            if bare not in adapters:
                raise AdapterError(f"{source}: adapter {key!r} has tensors but no config in __cfg__ "
                                   f"(which has {sorted(adapters)})")
            available.append(bare)
    if name is None:
        return available
    wanted = [name] if isinstance(name, str) else list(name)
    out = []
    for n in wanted:
        bare = n.split(":", 1)[-1]
        if bare not in available:
            raise AdapterError(f"{source}: no adapter {n!r}; the file holds {available}")
        out.append(bare)
    return out


def _kind(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("_target_", "")).rsplit(".", 1)[-1]


def _number(bare: str, cfg: Mapping, field: str, kind: type, default: Any = ...) -> Any:
    value = cfg.get(field, default)
    if value is ...:
        raise AdapterError(f"adapter {bare!r}: NeMo's config has no {field!r} ({_kind(cfg)} needs it)")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise AdapterError(f"adapter {bare!r}: config field {field!r} must be a number ({kind.__name__}), "
                           f"got {value!r}")
    return kind(value)


def _adapter_and_strategy(bare: str, cfg: Mapping[str, Any], mask_argument: Any) -> tuple[Any, Strategy]:
    """jadapters' adapter and strategy for NeMo's adapter config (``_target_`` and its arguments)."""
    kind = _kind(cfg)
    try:
        if kind == "LinearAdapter":
            adapter = LinearAdapter(dim=_number(bare, cfg, "dim", int), activation=cfg.get("activation", "swish"),
                                    norm_position=cfg.get("norm_position", "pre"),
                                    dropout=_number(bare, cfg, "dropout", float, 0.0))
        elif kind == "MultiHeadAttentionAdapter":
            adapter = MultiHeadAttentionAdapter(n_head=_number(bare, cfg, "n_head", int),
                                                n_feat=_number(bare, cfg, "n_feat", int),
                                                dropout_rate=_number(bare, cfg, "dropout_rate", float, 0.0),
                                                proj_dim=_number(bare, cfg, "proj_dim", int, None))
        else:
            raise AdapterError(f"adapter {bare!r}: NeMo adapter class {cfg.get('_target_')!r} is not supported; "
                               "jadapters loads LinearAdapter and MultiHeadAttentionAdapter")
    except ValueError as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"adapter {bare!r}: NeMo's {kind} config {dict(cfg)} is not valid: {e}") from None
    strategy_cfg = cfg.get("adapter_strategy") or {}
    target = str(strategy_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    residual = dict(stochastic_depth=_number(bare, strategy_cfg, "stochastic_depth", float, 0.0),
                    l2_lambda=_number(bare, strategy_cfg, "l2_lambda", float, 0.0))
    if target == "MHAResidualAddAdapterStrategy" or (target == "" and kind == "MultiHeadAttentionAdapter"):
        strategy = MHAResidualAdd(**residual, mask_argument=mask_argument)
    elif target in ("", "ResidualAddAdapterStrategy"):
        strategy = ResidualAdd(**residual)
    elif target == "ReturnResultAdapterStrategy":
        strategy = ReturnResult()
    else:
        raise AdapterError(f"adapter {bare!r}: NeMo adapter strategy {strategy_cfg.get('_target_')!r} is not "
                           "supported; jadapters maps ResidualAdd, MHAResidualAdd and ReturnResult")
    return adapter, strategy


def _placed_by_state_dict(state, chosen, adapters, model, params, module_map, mask_argument, source):
    """A model state dict: each adapter goes exactly on the modules holding its tensors."""
    to_flax = nemo_to_flax(module_map, params)
    found: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, array in state.items():
        if ADAPTER_LAYER not in key:
            continue
        module, rest = key.rsplit(ADAPTER_LAYER, 1)
        bare, _, param = rest.partition(".")
        if bare not in adapters:
            raise AdapterError(f"{source}: tensor {key!r} belongs to adapter {bare!r}, which the adapters config "
                               f"lacks (it has {sorted(adapters)})")
        if bare in chosen:
            found.setdefault(bare, {}).setdefault(module, {})[param] = np.asarray(array)
    adapted = model if isinstance(model, AdaptedModule) else with_adapters(model)
    specs = []
    for bare in chosen:
        if bare not in found:
            raise AdapterError(f"{source}: adapter {bare!r} is in the config but the weights hold no "
                               f"'<module>{ADAPTER_LAYER}{bare}.*' tensors")
        per_module = []  # (Flax path, tensor name prefix, params), in the state dict's (NeMo's module) order
        for module, params_of in found[bare].items():
            flax_path = to_flax(module)
            if not has_module(params, flax_path):
                raise AdapterError(f"{source}: adapter {bare!r} is on NeMo's module {module!r} (Flax path "
                                   f"{flax_path!r}), which the model's params lack; pass module_map")
            per_module.append((flax_path, f"{module}{ADAPTER_LAYER}{bare}.", params_of))
        adapter, strategy = _adapter_and_strategy(bare, adapters[bare], mask_argument)
        targets = list(dict.fromkeys(flax_path for flax_path, _, _ in per_module))
        adapted = adapted.add_adapter(bare, adapter, strategy=strategy, targets=targets,
                                      enabled=bool(adapters[bare].get("enabled", True)))
        specs.append((bare, per_module))
    return adapted, specs


def _placed_by_names(state, chosen, adapters, modules_of, model, targets, global_modules, mask_argument, source):
    """``save_adapters``' layout: each adapter goes where its qualified name places it."""
    if isinstance(model, AdaptedModule):
        if targets is not None or global_modules is not None:
            raise AdapterError("model is already an AdaptedModule: its module names place the adapters; "
                               "targets= and global_modules= are for a plain model")
        adapted = model
    elif targets is None:
        raise AdapterError(f"{source}: NeMo's save_adapters file does not name the modules holding adapters "
                           f"{chosen}: pass targets={{nemo module name: Flax targets}} (e.g. "
                           "{'encoder': 'encoder/layers_*'}) or an AdaptedModule declaring those module names")
    else:
        if global_modules is None and "encoder" in targets:
            global_modules = ["encoder"]
        adapted = with_adapters(model, targets, global_modules=global_modules)
    keys = {key.split(":", 1)[-1]: key for key in state}
    specs = []
    for bare in chosen:
        key = keys[bare]
        module = key.split(":", 1)[0] if ":" in key else modules_of.get(bare, "")
        qualified = f"{module}:{bare}" if module else bare
        states = state[key]
        if not isinstance(states, (list, tuple)):
            raise AdapterError(f"{source}: adapter {key!r}: expected a list of per-module state dicts, "
                               f"got {type(states).__name__}")
        adapter, strategy = _adapter_and_strategy(bare, adapters[bare], mask_argument)
        try:
            adapted = adapted.add_adapter(qualified, adapter, strategy=strategy,
                                          enabled=bool(adapters[bare].get("enabled", True)))
        except AdapterError as e:
            raise AdapterError(f"{source}: adapter {key!r}: {e}") from None
        per_module = [(f"{key}[{i}] {bare}.", {k[len(bare) + 1:]: np.asarray(v) for k, v in s.items()
                                               if k.startswith(bare + ".")}) for i, s in enumerate(states)]
        specs.append((bare, per_module))
    return adapted, specs


def _wanted(bare, cfg, new, per_module, order, source) -> dict:
    """``{Flax param key: (NeMo tensor name, Flax path, array in Flax layout)}`` for one adapter."""
    flat = traverse_util.flatten_dict(new.get("params", {}))
    placed = list(dict.fromkeys(k[: k.index(ADAPTERS_KEY)] for k in flat))
    if order is not None:  # save_adapters' i-th state dict -> the i-th module in call order
        rank = {tuple(p.split("/")) if p else (): i for i, p in enumerate(order)}
        placed.sort(key=lambda p: rank.get(p, len(rank)))
        stacked = any(k[-1] == "kernel" and len(v.shape) == 3 for k, v in flat.items())
        if len(placed) == 1 and len(per_module) > 1 and stacked:  # a layer inside nn.scan: one stacked adapter
            placed = placed * len(per_module)
        if len(placed) != len(per_module):
            raise AdapterError(f"{source}: adapter {bare!r}: the file holds {len(per_module)} module(s), the "
                               f"model places it on {len(placed)}: {['/'.join(p) for p in placed]} (check "
                               "targets= / global_modules=)")
        items = [(p, name, params) for p, (name, params) in zip(placed, per_module)]
    else:
        items = [(tuple(p.split("/")), name, params) for p, name, params in per_module]
    kind = _kind(cfg)
    if kind == "MultiHeadAttentionAdapter":
        names, variant = _MHA, kind
    else:
        position = cfg.get("norm_position", "pre")
        names, variant = _LINEAR[position], f"{kind}, norm_position={position!r}"
    found: dict[tuple[str, ...], list[tuple[str, str, np.ndarray]]] = {}
    for path, prefix, params in items:  # prefix + param = the tensor's name in the file
        for param, array in params.items():
            if param not in names:
                raise AdapterError(f"{source}: adapter {bare!r}: tensor {prefix + param!r} is not a param of NeMo's "
                                   f"{variant}; expected {sorted(names)} after {prefix!r}")
            leaf = names[param]
            value = array.T if leaf[-1] == "kernel" else array
            found.setdefault(path + (ADAPTERS_KEY, bare) + leaf, []).append((prefix + param, "/".join(path), value))
    wanted = {}
    for key, tensors in found.items():
        if len(tensors) == 1:
            wanted[key] = tensors[0]
        else:  # several NeMo modules on one Flax path (layers inside nn.scan): stacked in NeMo's module order
            arrays = [a for _, _, a in tensors]
            if len({a.shape for a in arrays}) > 1:
                raise AdapterError(f"{source}: adapter {bare!r}: tensors {[t for t, _, _ in tensors]} go to one "
                                   f"Flax param, {'/'.join(key)!r}, but their shapes differ")
            wanted[key] = (", ".join(t for t, _, _ in tensors), tensors[0][1], np.stack(arrays))
    return wanted


# ---------------------------------------------------------------------------------------------- files in


def load_nemo_adapters(
    path: str | Path,
    model: Any,
    variables: Mapping[str, Any],
    *inputs: Any,
    name: str | Sequence[str] | None = None,
    targets: Mapping[str, Any] | None = None,
    global_modules: Sequence[str] | None = None,
    module_map: ModuleMap = None,
    mask_argument: int | str | None = None,
    **kwargs: Any,
) -> tuple[AdaptedModule, dict]:
    """Loads the adapters of NeMo's ``save_adapters`` file or of a ``.nemo`` archive onto a Flax model.

    Needs torch (``pip install 'jadapters[nemo]'``) to read NeMo's torch files, with
    ``weights_only=True``. Arguments and result as :func:`load_nemo_state_dict` (which
    this calls with :func:`read_nemo_file`'s arrays): ``targets`` places a
    ``save_adapters`` file's adapters on a plain model, ``module_map`` maps an archive's
    module names.

    Example:
        >>> adapted, new = jadapters.load_nemo_adapters(  # doctest: +SKIP
        ...     "asr_adapters.pt", model, params, features, lengths,
        ...     targets={"encoder": "encoder/layers_*"})
    """
    state, config = read_nemo_file(path)
    return load_nemo_state_dict(state, config, model, variables, *inputs, name=name, targets=targets,
                                global_modules=global_modules, module_map=module_map, mask_argument=mask_argument,
                                source=str(path), **kwargs)


def read_nemo_file(path: str | Path) -> tuple[dict, dict]:
    """``(state, adapters config)`` of a ``save_adapters`` file or a ``.nemo`` archive, arrays as numpy.

    The state is ``save_adapters``' ``{qualified name: [state dict, ...]}`` or, for an
    archive, the adapter tensors of its model state dict; the config is plain dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file (expected NeMo's save_adapters file or a .nemo archive)")
    if tarfile.is_tarfile(path):  # first: an archive's weights file is a zip, found inside the tar
        return _read_archive(path)
    if zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            saved = _torch_load(f, str(path), config_allowed=True)
        if not isinstance(saved, dict) or "__cfg__" not in saved:
            raise AdapterError(f"{path}: not a file of NeMo's save_adapters (a dict with '__cfg__'); found "
                               f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")
        config = _plain(saved.pop("__cfg__"), str(path))
        state = {key: [{k: _numpy(v) for k, v in s.items()} for s in states] for key, states in saved.items()}
        return state, config
    raise AdapterError(f"{path}: not a NeMo file: expected save_adapters' torch file (a zip) or a .nemo archive "
                       "(a tar)")


def _read_archive(path: Path) -> tuple[dict, dict]:
    with tarfile.open(path, "r:*") as tar:
        members = {posixpath.normpath(m.name): m for m in tar.getmembers() if m.isfile()}
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in members]
        if missing:
            sharded = sorted(n for n in members if n.endswith("/" + WEIGHTS_NAME))
            hint = f" (model-parallel shards {sharded} are not supported)" if sharded else ""
            raise AdapterError(f"{path}: a .nemo archive holds {CONFIG_NAME} and {WEIGHTS_NAME}; {missing} missing "
                               f"from {sorted(members)}{hint}")
        try:
            model_config = yaml.safe_load(tar.extractfile(members[CONFIG_NAME]).read())
        except yaml.YAMLError as e:
            raise AdapterError(f"{path}: {CONFIG_NAME} is not readable YAML ({e})") from None
        config = model_config.get("adapters") if isinstance(model_config, dict) else None
        if not isinstance(config, dict) or not [k for k in config if k != GLOBAL_CFG]:
            raise AdapterError(f"{path}: {CONFIG_NAME} has no 'adapters' section: the model holds no adapters")
        weights = _torch_load(tar.extractfile(members[WEIGHTS_NAME]), f"{path}:{WEIGHTS_NAME}",
                              config_allowed=False)
    if isinstance(weights, dict) and "state_dict" in weights and isinstance(weights["state_dict"], dict):
        weights = weights["state_dict"]
    if not isinstance(weights, dict):
        raise AdapterError(f"{path}: {WEIGHTS_NAME} is not a state dict ({type(weights).__name__})")
    return {k: _numpy(v) for k, v in weights.items() if ADAPTER_LAYER in k}, config


class _Inert:
    """What an admitted global of a torch file becomes: it records its arguments and state, and runs nothing."""

    pickled_name = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _globals(data: bytes, source: str) -> set[str]:
    """The globals a pickle refers to, ``module.name``."""
    found, strings = set(), []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception as e:  # a corrupt pickle
        raise AdapterError(f"{source}: not a readable torch file ({type(e).__name__}: {e})") from None
    return found


def _torch_load(file: Any, source: str, config_allowed: bool) -> Any:
    """``torch.load(file, weights_only=True)`` after checking the pickle's globals; ``file`` is seekable."""
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise AdapterError(f"{source}: not a torch file (a zip with one data.pkl)")
            names = _globals(archive.read(pickles[0]), source)
    except zipfile.BadZipFile:
        raise AdapterError(f"{source}: not a torch file saved by torch.save (a zip archive)") from None
    admitted = {n for n in names if config_allowed and _ADMITTED.match(n)}
    # what torch's weights_only unpickler itself admits (tensors, their storages, OrderedDict, bytes)
    torch_names = {n for n in names
                   if n in ("collections.OrderedDict", "_codecs.encode") or n.split(".", 1)[0] == "torch"}
    refused = sorted(names - admitted - torch_names)
    if refused:
        raise AdapterError(f"{source}: refused: the file holds {refused}, which are neither tensors nor "
                           "NeMo's adapter config; jadapters loads NeMo's files with weights_only=True")
    torch = _import_torch()
    stand_ins = []
    for n in sorted(admitted):
        stand_in = type(n.rsplit(".", 1)[-1], (_Inert,), {"pickled_name": n})
        module, _, attr = n.rpartition(".")
        # protocol 2 writes Python 2 names (__builtin__.unicode); the unpickler reads Python 3's
        stand_ins += [(stand_in, n), (stand_in, ".".join(_compat_pickle.NAME_MAPPING.get(
            (module, attr), (_compat_pickle.IMPORT_MAPPING.get(module, module), attr))))]
    try:
        with torch.serialization.safe_globals(stand_ins):
            file.seek(0)
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's UnpicklingError and corrupt data
        raise AdapterError(f"{source}: torch.load(weights_only=True) refused the file: {e}") from None


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("reading NeMo's torch files needs torch: pip install 'jadapters[nemo]' (or use "
                          "jadapters.load_nemo_state_dict with arrays already in memory)") from None
    return torch


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4 or str(value.dtype) == "torch.float16":
            return value.numpy()
        return value.float().numpy()  # bfloat16 and float8 have no numpy dtype
    return np.asarray(value)


def _plain(node: Any, source: str) -> Any:
    """An omegaconf config rebuilt from its placeholders as plain dicts, lists and values."""
    if isinstance(node, _Inert):
        kind = node.pickled_name.rsplit(".", 1)[-1]
        state = node.state if isinstance(node.state, dict) else {}
        if kind in ("DictConfig", "ListConfig"):
            return _plain(state.get("_content"), source)
        if node.pickled_name.startswith("omegaconf.nodes."):
            return _plain(state.get("_val"), source)
        raise AdapterError(f"{source}: unexpected {node.pickled_name} as a value in NeMo's adapter config")
    if isinstance(node, dict):
        return {k: _plain(v, source) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v, source) for v in node]
    return node
