"""AdapterHub's adapter format in and out: ``adapter_config.json`` + ``adapter.safetensors``.

:func:`load_adapterhub` reads an adapter saved by AdapterHub's ``adapters``
(``model.save_adapter(..., use_safetensors=True)``) onto a Flax model:
bottlenecks (``seq_bn``, ``double_seq_bn``, ``par_bn``, ``scaled_par_bn`` and
any other ``BnConfig``), Compacter (``compacter``, ``compacter++``), LoRA, IA3
(AdapterHub's: it scales the adapted layers' outputs), prefix tuning (flat
or through its reparametrisation MLP), prompt tuning, gated LoRA, prefix and
bottlenecks, and unions of bottleneck, LoRA and prefix tuning (``mam``,
``unipelt``: a :class:`jadapters.ConfigUnion` under the file's name).
:func:`save_adapterhub` writes one of jadapters' adapters of those methods
(a union by its name) in AdapterHub's layout.

The name rule: AdapterHub's tensor ``<torch module>.adapters.<name>.<tensor>``
(bottlenecks) or ``<torch module>.loras.<name>.<tensor>`` (LoRA, IA3) is the
Flax module ``<torch module>`` with ``.`` replaced by ``/``, as Hugging Face's
Flax models name theirs (``encoder.layer.0.output`` -> ``encoder/layer/0/output``);
a torch name with a head model's prefix (``bert.encoder...``) that the Flax
model lacks loses it. ``module_map`` is the same as for
:func:`jadapters.load_peft`. Tensors change layout as torch's Linear weight
``(out, in)`` becomes a Flax kernel ``(in, out)``:

=========================================  ======================================  =========
AdapterHub tensor                          jadapters param under the adapter       layout
=========================================  ======================================  =========
``adapter_down.0.weight`` / ``.bias``      ``adapter_down/kernel`` / ``bias``      transpose
``adapter_up.weight`` / ``.bias``          ``adapter_up/kernel`` / ``bias``        transpose
``adapter_down.0.W_left`` (PHM) etc.       ``adapter_down/W_left``
``adapter_norm_before.weight``             ``adapter_norm_before/scale``
``gate.weight`` / ``scaling``              ``gate/kernel`` / ``scaling``           transpose
``loras.<name>.gate.weight`` / ``.bias``   ``gate/kernel`` / ``gate/bias``         transpose
``prefix_tuning.prefix_gates.<name>.*``    the attention layer's ``gate``          transpose
``shared_parameters.<name>.phm_rule``      ``__shared__/phm_rule`` at the root
``loras.<name>.lora_A`` / ``lora_B``       ``lora_a/kernel`` / ``lora_b/kernel``   transpose
``loras.<name>.lora_B`` (IA3, (out, 1))    ``ia3_l`` (out,), times ``alpha``        ravel
``prefix_tuning.prefix_tunings.<name>.``   per attention layer ``embedding``,
``self_prefix.wte`` / ``control_trans.*``  ``down``, ``up`` (layer l's rows of the
                                           last Linear) or ``keys`` / ``values``
``prompt_tuning.prompt_tunings.<name>.``   the prompt adapter's ``embedding``
``prompt_embedding.weight``
=========================================  ======================================  =========

Bottleneck, prefix and prompt adapters place themselves from their config and the
model's preset (the file's tensors must then be exactly what they create);
LoRA and IA3 go exactly on the modules the file holds tensors for.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jadapters.adapters.bottleneck import BnConfig, Bottleneck
from jadapters.adapters.ia3 import IA3, IA3Config
from jadapters.adapters.lora import LoRA, LoraConfig
from jadapters.adapters.prefix import PrefixTuning, PrefixTuningConfig
from jadapters.adapters.prompt import PromptTuning, PromptTuningConfig
from jadapters.configs import parse_method
from jadapters.errors import AdapterError
from jadapters.interop import (ModuleMap, adapter_params, add_and_init, fill_params, flax_to_torch, has_module,
                               read_dir, torch_to_flax, write_dir)
from jadapters.transform import AdaptedModule, AdapterGroup, AdapterSpec
from jadapters.union import PART_SEPARATOR, ConfigUnion
from jadapters.tree import ADAPTERS_KEY, merge_trees, split_adapters

__all__ = ["load_adapterhub", "load_adapterhub_fusion", "save_adapterhub", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
TORCH_PICKLE = "pytorch_adapter.bin"
VERSION = "adapters.1.3.0"
SHARED = "__shared__"

#: The ``config`` fields AdapterHub 1.3 writes, per architecture; others are warned about and ignored.
_BN_FIELDS = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
              "original_ln_after", "ln_before", "ln_after", "init_weights", "init_weights_seed", "is_parallel",
              "scaling", "use_gating", "residual_before_ln", "adapter_residual_before_ln", "inv_adapter",
              "inv_adapter_reduction_factor", "cross_adapter", "leave_out", "dropout", "phm_layer", "phm_dim",
              "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
              "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias",
              "stochastic_depth")
_KNOWN = {
    "bottleneck": {"architecture", *_BN_FIELDS},
    "lora": {"architecture", "selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "r", "alpha",
             "dropout", "attn_matrices", "composition_mode", "init_weights", "init_weights_seed", "use_gating",
             "use_dora", "dtype", "vera_d", "vera_b"},
    "prefix_tuning": {"architecture", "encoder_prefix", "cross_prefix", "leave_out", "flat", "prefix_length",
                      "bottleneck_size", "non_linearity", "dropout", "use_gating", "shared_gating",
                      "init_weights_seed"},
    "prompt_tuning": {"architecture", "prompt_length", "prompt_init", "prompt_init_text", "combine",
                      "init_weights_seed"},
    "union": {"architecture", "configs"},
}
_PART_ARCHITECTURES = ("bottleneck", "lora", "prefix_tuning")
#: AdapterHub's LoRA ``attn_matrices`` letters and FFN switches -> the last parts of BERT-like torch names.
_LORA_PLACES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                "intermediate_lora": "intermediate.dense", "output_lora": "output.dense"}


# ---------------------------------------------------------------------------------------------- names


def bottleneck_leaf(tensor: str) -> tuple[tuple[str, ...], bool]:
    """AdapterHub's tensor under ``.adapters.<name>.`` -> (jadapters' leaf, whether to transpose).

    ``adapter_down.0.weight`` -> ``('adapter_down', 'kernel')``, transposed (the ``0`` is
    the Linear's index in AdapterHub's ``Sequential``); LayerNorm weights are ``scale``.

    Example:
        >>> bottleneck_leaf("adapter_down.0.weight"), bottleneck_leaf("adapter_norm_after.weight")
        ((('adapter_down', 'kernel'), True), (('adapter_norm_after', 'scale'), False))
    """
    *module, leaf = [part for part in tensor.split(".") if part != "0"]
    if leaf == "weight":
        norm = bool(module) and module[0].startswith("adapter_norm")
        return (*module, "scale" if norm else "kernel"), not norm
    return (*module, leaf), False


def bottleneck_tensor(leaf: tuple[str, ...]) -> tuple[str, bool]:
    """The inverse of :func:`bottleneck_leaf`.

    Example:
        >>> bottleneck_tensor(("adapter_down", "kernel")), bottleneck_tensor(("adapter_up", "b"))
        (('adapter_down.0.weight', True), ('adapter_up.b', False))
    """
    *module, last = leaf
    if module[:1] == ["adapter_down"]:
        module = ["adapter_down", "0", *module[1:]]
    return ".".join([*module, {"kernel": "weight", "scale": "weight"}.get(last, last)]), last == "kernel"


def _natural(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


# ---------------------------------------------------------------------------------------------- loading


def load_adapterhub(
    path: str | Path,
    model: Any,
    variables: Mapping[str, Any],
    *inputs: Any,
    adapter_name: str | None = None,
    module_map: ModuleMap = None,
    **kwargs: Any,
) -> tuple[AdaptedModule, dict]:
    """Loads an adapter saved by AdapterHub (``save_adapter(..., use_safetensors=True)``) onto a Flax model.

    Args:
        path: AdapterHub's adapter directory (``adapter_config.json``, ``adapter.safetensors``).
        model: a plain Flax model (e.g. a Hugging Face Flax model's ``.module``, which gets its
            preset) or an :class:`jadapters.AdaptedModule`, to which the adapter is added.
        variables: the model's variables, ``{'params': ...}``.
        *inputs: sample inputs, as for :func:`jadapters.init_adapters` (``**kwargs`` too).
        adapter_name: the adapter's name in jadapters; None: the file's (the config's ``name``).
        module_map: ``fn(torch_module_name) -> flax_path`` (or a dict) where the model's Flax
            paths are not its torch names with ``/`` for ``.``.

    Returns:
        ``(adapted, variables)``: the model with the adapter and new variables holding the
        file's arrays (``variables`` passed in is unchanged).

    Bottlenecks, prefix and prompt tuning place themselves with the model's preset (its sites),
    so the model needs one; config fields jadapters does not know (a newer AdapterHub) are ignored
    with a warning. A directory holding only ``pytorch_adapter.bin`` (AdapterHub's default, a
    torch pickle) is an error: re-save it with ``use_safetensors=True``.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
        >>> x = jnp.ones((2, 4))
        >>> base = nn.Sequential([nn.Dense(4), nn.Dense(3)])
        >>> params = base.init(jax.random.key(0), x)
        >>> adapted = jadapters.with_adapters(base).add_adapter(
        ...     "a", jadapters.LoraConfig(r=2, target_modules=["layers_1"], init_lora_weights=False))
        >>> variables = jadapters.init_adapters(adapted, params, jax.random.key(1), x)
        >>> folder, names = tempfile.mkdtemp(), {"output.dense": "layers_1"}  # torch name: Flax path
        >>> jadapters.save_adapterhub(folder, adapted, variables, module_map=names)
        >>> loaded, new = jadapters.load_adapterhub(folder, base, params, x, module_map=names)
        >>> loaded.adapter_names(), bool(jnp.allclose(loaded.apply(new, x), adapted.apply(variables, x)))
        (['a'], True)
    """
    path = Path(path)
    if not (path / WEIGHTS_NAME).exists() and (path / TORCH_PICKLE).is_file():
        raise AdapterError(f"{path}: holds only {TORCH_PICKLE}, a torch pickle, which jadapters does not unpickle; "
                           f"re-save the adapter with AdapterHub's save_adapter(..., use_safetensors=True)")
    full, tensors = read_dir(path, CONFIG_NAME, WEIGHTS_NAME, "AdapterHub")
    config, file_name = full.get("config"), full.get("name")
    if not isinstance(config, dict) or not isinstance(file_name, str):
        raise AdapterError(f"{path / CONFIG_NAME}: expected AdapterHub's config with 'config' (an object) and "
                           f"'name' (a string)")
    architecture = config.get("architecture") or "bottleneck"
    if architecture not in _KNOWN:
        raise AdapterError(f"{path / CONFIG_NAME}: architecture {architecture!r} is not supported; jadapters loads "
                           f"{sorted(_KNOWN)}")
    unknown = sorted(set(config) - _KNOWN[architecture])
    if unknown:
        warnings.warn(f"{path / CONFIG_NAME}: ignoring config field(s) jadapters does not know: {unknown}",
                      stacklevel=2)
    name = adapter_name or file_name
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    locate = _locator(path, torch_to_flax(module_map), params, module_map is None)

    if architecture == "union":
        method, parts = _union_config(path, config, tensors, file_name, locate)
        adapted, new, rest = add_and_init(model, name, method, variables, *inputs, **kwargs)
        wanted = {}
        for suffix, (part_architecture, part_config, part_tensors) in zip(method.part_names(), parts):
            wanted.update(_wanted(path, part_architecture, part_config, part_tensors, file_name,
                                  f"{name}{PART_SEPARATOR}{suffix}", locate, new))
    elif architecture == "bottleneck":
        method = _config(path, BnConfig, {k: config[k] for k in _BN_FIELDS if k in config})
        adapted, new, rest = add_and_init(model, name, method, variables, *inputs, **kwargs)
        wanted = _bottleneck_wanted(path, tensors, file_name, name, locate)
    elif architecture == "lora":
        method, wanted = _lora(path, config, tensors, file_name, name, locate)
        adapted, new, rest = add_and_init(model, name, method, variables, *inputs, **kwargs)
    elif architecture == "prefix_tuning":
        method = _prefix_config(path, config)
        adapted, new, rest = add_and_init(model, name, method, variables, *inputs, **kwargs)
        wanted = _prefix_wanted(path, tensors, file_name, name, new, method.projection, locate)
    else:
        fields = {k: config[k] for k in ("prompt_length", "prompt_init", "combine") if k in config}
        method = _config(path, PromptTuningConfig, {"style": "adapterhub", **fields})
        adapted, new, rest = add_and_init(model, name, method, variables, *inputs, **kwargs)
        wanted = _prompt_wanted(path, tensors, file_name, new)
    new = fill_params(path / WEIGHTS_NAME, new, wanted, name, _hint(architecture, file_name))
    return adapted, merge_trees(rest, new)


def _union_config(path: Path, config: dict, tensors: Mapping[str, np.ndarray], file_name: str,
                  locate: Callable[[str, str], str]) -> tuple[ConfigUnion, list]:
    """AdapterHub's ``ConfigUnion`` -> jadapters' and, per part, ``(architecture, config, its tensors)``."""
    subs = config.get("configs")
    if not isinstance(subs, list) or not subs:
        raise AdapterError(f"{path / CONFIG_NAME}: a union's config needs 'configs', a list of method configs")
    claimed: set[str] = set()
    parts = []
    for sub in subs:
        architecture = sub.get("architecture") or "bottleneck"
        if architecture not in _PART_ARCHITECTURES:
            raise AdapterError(f"{path / CONFIG_NAME}: a union's part of architecture {architecture!r} is not "
                               f"supported; jadapters loads unions of {list(_PART_ARCHITECTURES)}")
        unknown = sorted(set(sub) - _KNOWN[architecture])
        if unknown:
            warnings.warn(f"{path / CONFIG_NAME}: ignoring config field(s) jadapters does not know: {unknown}",
                          stacklevel=3)
        mine = {t: a for t, a in tensors.items() if _part_of(t, file_name) == architecture}
        claimed |= set(mine)
        if architecture == "bottleneck":
            method = _config(path, BnConfig, {k: sub[k] for k in _BN_FIELDS if k in sub})
        elif architecture == "lora":
            method, _ = _lora(path, sub, mine, file_name, file_name, locate)
        else:
            method = _prefix_config(path, sub)
        parts.append((architecture, method, mine))
    extra = sorted(set(tensors) - claimed)
    if extra:
        raise AdapterError(f"{path / WEIGHTS_NAME}: tensor(s) {extra} belong to no part of the union "
                           f"{[a for a, _, _ in parts]}")
    try:
        return ConfigUnion(*(method for _, method, _ in parts)), parts
    except ValueError as e:
        raise AdapterError(f"{path / CONFIG_NAME}: config not supported: {e}") from None


def _part_of(tensor: str, file_name: str) -> str | None:
    """The architecture an AdapterHub tensor belongs to, by its name."""
    if f".adapters.{file_name}." in tensor or tensor.startswith(f"shared_parameters.{file_name}."):
        return "bottleneck"
    if f".loras.{file_name}." in tensor:
        return "lora"
    if tensor.startswith(f"prefix_tuning.prefix_tunings.{file_name}.") or f".prefix_gates.{file_name}." in tensor:
        return "prefix_tuning"
    return None


def _wanted(path: Path, architecture: str, method: Any, tensors: Mapping[str, np.ndarray], file_name: str,
            name: str, locate: Callable[[str, str], str], new: Mapping) -> dict:
    """One union part's ``{Flax param key: (tensor, Flax path, array)}``."""
    if architecture == "bottleneck":
        return _bottleneck_wanted(path, tensors, file_name, name, locate)
    if architecture == "lora":
        return _lora(path, {"composition_mode": "add", "use_gating": method.use_gating}, tensors, file_name, name,
                     locate)[1]
    return _prefix_wanted(path, tensors, file_name, name, new, method.projection, locate)


FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAME = "model_adapter_fusion.safetensors"
_FUSION_LEAVES = {"weight": ("kernel", True), "bias": ("bias", False)}


def load_adapterhub_fusion(
    path: str | Path,
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    *inputs: Any,
    module_map: ModuleMap = None,
    **kwargs: Any,
) -> tuple[AdaptedModule, dict]:
    """Loads an AdapterFusion saved by AdapterHub (``save_adapter_fusion(..., use_safetensors=True)``).

    ``adapted`` already holds the fused adapters (e.g. from :func:`load_adapterhub`);
    the result has ``Fuse(*adapter_names, config=..., name=...)`` as its
    active setup and ``variables`` plus the fusion's params (the file's
    ``adapter_fusion_layer.<name>.{query,key,value}`` tensors, transposed to
    Flax's layout). ``inputs``, ``kwargs`` and ``module_map`` as for
    :func:`load_adapterhub`.
    """
    from jadapters.composition import Fuse
    from jadapters.transform import init_adapters

    path = Path(path)
    full, tensors = read_dir(path, FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME, "AdapterHub fusion")
    names, name = full.get("adapter_names"), full.get("name")
    if not isinstance(names, list) or not isinstance(name, str) or not isinstance(full.get("config"), dict):
        raise AdapterError(f"{path / FUSION_CONFIG_NAME}: expected AdapterHub's fusion config with 'adapter_names' "
                           f"(a list), 'name' (a string) and 'config' (an object)")
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"load_adapterhub_fusion expects the AdaptedModule holding the adapters {names}, "
                           f"got {type(adapted).__name__}")
    adapted = adapted.set_active(Fuse(*names, config=full["config"], name=name))
    created = init_adapters(adapted, variables, jax.random.key(0), *inputs, **kwargs)
    new, rest = split_adapters(created, [name])
    locate = _locator(path, torch_to_flax(module_map), variables.get("params", {}), module_map is None)
    wanted = {}
    for tensor, array in sorted(tensors.items()):
        module, rest_name = _split(path, tensor, f".adapter_fusion_layer.{name}.")
        linear, _, kind = rest_name.partition(".")
        if kind not in _FUSION_LEAVES:
            raise AdapterError(f"{path / FUSION_WEIGHTS_NAME}: tensor {tensor!r} is not a fusion weight or bias")
        flax_path = locate(module, tensor)
        leaf, transpose = _FUSION_LEAVES[kind]
        wanted[(*flax_path.split("/"), ADAPTERS_KEY, name, linear, leaf)] = (tensor, flax_path,
                                                                           array.T if transpose else array)
    new = fill_params(path / FUSION_WEIGHTS_NAME, new, wanted, name, "check the fusion config")
    return adapted, merge_trees(rest, new)


def _hint(architecture: str, file_name: str) -> str:
    if architecture == "bottleneck":
        return (f"check the config; a Compacter's shared rule is 'shared_parameters.{file_name}.phm_rule', which "
                "AdapterHub's save_adapter leaves out on a model without a head prefix")
    return f"check the config: {architecture}"


def _config(path: Path, cls: type, fields: dict) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path / CONFIG_NAME}: config not supported: {e}") from None


def _locator(path: Path, to_flax: Callable[[str], str], params: Mapping[str, Any],
             default_rule: bool) -> Callable[[str, str], str]:
    """``fn(torch module name, tensor) -> Flax path`` of a module the model has, or an AdapterError."""

    def locate(torch_name: str, tensor: str) -> str:
        flax_path = to_flax(torch_name)
        if not has_module(params, flax_path) and default_rule and "/" in flax_path:
            head_less = flax_path.split("/", 1)[1]  # 'bert.encoder...' saved from a model with a head
            flax_path = head_less if has_module(params, head_less) else flax_path
        if not has_module(params, flax_path):
            raise AdapterError(f"{path / WEIGHTS_NAME}: tensor {tensor!r}: module {torch_name!r} (Flax path "
                               f"{flax_path!r}) is absent from the model's params; pass module_map if its Flax "
                               "names differ")
        return flax_path

    return locate


def _split(path: Path, tensor: str, marker: str) -> tuple[str, str]:
    module, found, rest = tensor.partition(marker)
    if not found or not module:
        raise AdapterError(f"{path / WEIGHTS_NAME}: tensor {tensor!r} is not supported; expected "
                           f"'<module>{marker}<tensor>'")
    return module, rest


def _bottleneck_wanted(path: Path, tensors: Mapping[str, np.ndarray], file_name: str, name: str,
                       locate: Callable[[str, str], str]) -> dict:
    wanted, shared = {}, f"shared_parameters.{file_name}."
    for tensor, array in sorted(tensors.items()):
        if tensor.startswith(shared):
            key, flax_path, transpose = (ADAPTERS_KEY, name, SHARED, tensor[len(shared):]), "", False
        else:
            module, rest = _split(path, tensor, f".adapters.{file_name}.")
            flax_path = locate(module, tensor)
            leaf, transpose = bottleneck_leaf(rest)
            key = (*flax_path.split("/"), ADAPTERS_KEY, name, *leaf)
        wanted[key] = (tensor, flax_path, array.T if transpose else array)
    return wanted


def _lora(path: Path, config: dict, tensors: Mapping[str, np.ndarray], file_name: str, name: str,
          locate: Callable[[str, str], str]) -> tuple[Any, dict]:
    if config.get("use_dora"):
        raise AdapterError(f"{path / CONFIG_NAME}: AdapterHub's LoRA with use_dora=True is not supported")
    gated = bool(config.get("use_gating"))
    if config.get("vera_d") is not None or config.get("vera_b") is not None:
        raise AdapterError(f"{path / CONFIG_NAME}: AdapterHub's VeRA (vera_d / vera_b) is not supported")
    mode = config.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        raise AdapterError(f"{path / CONFIG_NAME}: composition_mode {mode!r} is not supported ('add': LoRA, "
                           "'scale': IA3)")
    alpha, wanted, paths = config.get("alpha", 8), {}, {}
    for tensor, array in sorted(tensors.items()):
        module, leaf = _split(path, tensor, f".loras.{file_name}.")
        flax_path = paths.setdefault(module, locate(module, tensor))
        at = (*flax_path.split("/"), ADAPTERS_KEY, name)
        if mode == "scale" and leaf == "lora_B":  # IA3: y = (W x + b) * (lora_B * alpha)
            wanted[(*at, "ia3_l")] = (tensor, flax_path, np.ravel(array) * np.asarray(alpha, array.dtype))
        elif mode == "add" and leaf in ("lora_A", "lora_B"):
            wanted[(*at, leaf.lower(), "kernel")] = (tensor, flax_path, array.T)
        elif mode == "add" and gated and leaf in ("gate.weight", "gate.bias"):
            wanted[(*at, "gate", "kernel" if leaf.endswith("weight") else "bias")] = (
                tensor, flax_path, array.T if leaf.endswith("weight") else array)
        else:
            raise AdapterError(f"{path / WEIGHTS_NAME}: tensor {tensor!r} is not supported for composition_mode "
                               f"{mode!r} (expected lora_A and lora_B (and a gate with use_gating), or IA3's "
                               "lora_B)")
    if not paths:
        raise AdapterError(f"{path / WEIGHTS_NAME}: no adapter tensors in the file")
    targets = tuple(paths.values())
    if mode == "scale":
        if gated:
            raise AdapterError(f"{path / CONFIG_NAME}: AdapterHub's IA3 with use_gating=True is not supported")
        return _config(path, IA3Config, {"target_modules": targets, "feedforward_modules": ()}), wanted
    fields = {"r": config.get("r", 8), "lora_alpha": alpha, "target_modules": targets,
              "lora_dropout": float(config.get("dropout") or 0.0), "use_gating": gated}
    return _config(path, LoraConfig, fields), wanted


def _prefix_config(path: Path, config: dict) -> PrefixTuningConfig:
    if config.get("leave_out") or config.get("encoder_prefix") is False:
        raise AdapterError(f"{path / CONFIG_NAME}: prefix tuning with leave_out or encoder_prefix=False is not "
                           "supported")
    fields = {k: config[k] for k in ("prefix_length", "flat", "bottleneck_size", "non_linearity", "dropout",
                                     "cross_prefix", "use_gating", "shared_gating") if k in config}
    return _config(path, PrefixTuningConfig, {"style": "adapterhub", **fields})


def _prefix_wanted(path: Path, tensors: Mapping[str, np.ndarray], file_name: str, name: str, new: Mapping,
                   projection: bool, locate: Callable[[str, str], str]) -> dict:
    """AdapterHub's one pool for all layers -> each attention layer's params (in the model's order); gates
    ``<attention>.prefix_tuning.prefix_gates.<name>.*`` -> that attention layer's ``gate``."""
    gate_marker = f".prefix_tuning.prefix_gates.{file_name}."
    gates = {t: a for t, a in tensors.items() if gate_marker in t}
    tensors = {t: a for t, a in tensors.items() if t not in gates}
    root = f"prefix_tuning.prefix_tunings.{file_name}.self_prefix."
    needed = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
              "control_trans.2.bias") if projection else ("control_trans",)
    extra = sorted(set(tensors) - {root + t for t in needed})
    lacking = [root + t for t in needed if root + t not in tensors]
    if extra or lacking:
        raise AdapterError(f"{path / WEIGHTS_NAME}: prefix tuning (flat={not projection}) expects the tensors "
                           f"{[root + t for t in needed]}; missing {lacking}, not supported {extra}")
    layers = sorted({"/".join(k[: k.index(ADAPTERS_KEY)]) for k in traverse_util.flatten_dict(new["params"])
                     if k[k.index(ADAPTERS_KEY) + 1] == name}, key=_natural)
    wanted = {}
    for tensor, array in sorted(gates.items()):
        module, leaf = _split(path, tensor, gate_marker)
        flax_path = locate(module, tensor)
        key = (*flax_path.split("/"), ADAPTERS_KEY, name, "gate", "kernel" if leaf == "weight" else "bias")
        wanted[key] = (tensor, flax_path, array.T if leaf == "weight" else array)
    for index, flax_path in enumerate(layers):
        at = (*flax_path.split("/"), ADAPTERS_KEY, name)
        if projection:
            t = {name: tensors[root + name] for name in needed}
            width = t["control_trans.2.weight"].shape[0] // (2 * len(layers))
            rows = slice(2 * index * width, (2 * index + 2) * width)  # layer l's keys then values
            for leaf, tensor, array in (("embedding", "wte.weight", t["wte.weight"]),
                                        ("down/kernel", "control_trans.0.weight", t["control_trans.0.weight"].T),
                                        ("down/bias", "control_trans.0.bias", t["control_trans.0.bias"]),
                                        ("up/kernel", "control_trans.2.weight", t["control_trans.2.weight"][rows].T),
                                        ("up/bias", "control_trans.2.bias", t["control_trans.2.bias"][rows])):
                wanted[(*at, *leaf.split("/"))] = (root + tensor, flax_path, array)
        else:
            flat = tensors[root + "control_trans"]
            length = traverse_util.flatten_dict(new["params"])[(*at, "keys")].shape
            per = length[0] * 2 * len(layers) * length[1]
            if flat.size != per:
                raise AdapterError(f"{path / WEIGHTS_NAME}: tensor {root + 'control_trans'!r} has shape "
                                   f"{flat.shape}, the model's {len(layers)} attention layers expect ({per},)")
            kv = flat.reshape(length[0], 2 * len(layers), length[1])
            wanted[(*at, "keys")] = (root + "control_trans", flax_path, kv[:, 2 * index])
            wanted[(*at, "values")] = (root + "control_trans", flax_path, kv[:, 2 * index + 1])
    return wanted


def _prompt_wanted(path: Path, tensors: Mapping[str, np.ndarray], file_name: str, new: Mapping) -> dict:
    """AdapterHub's prompt embedding -> the prompt adapter's ``embedding`` (where the model's preset puts it)."""
    tensor = f"prompt_tuning.prompt_tunings.{file_name}.prompt_embedding.weight"
    if set(tensors) != {tensor}:
        raise AdapterError(f"{path / WEIGHTS_NAME}: prompt tuning expects the tensor {tensor!r} only, the file has "
                           f"{sorted(tensors)}")
    return {key: (tensor, "/".join(key[: key.index(ADAPTERS_KEY)]), tensors[tensor])
            for key in traverse_util.flatten_dict(new["params"])}


# ---------------------------------------------------------------------------------------------- saving


def save_adapterhub(
    path: str | Path,
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    name: str | None = None,
    module_map: ModuleMap = None,
) -> None:
    """Writes one adapter in AdapterHub's format: ``adapter_config.json`` + ``adapter.safetensors``.

    Args:
        path: the directory (created if needed).
        adapted: the adapted model.
        variables: its variables.
        name: the adapter to write (also the name in the files); None: the model's only adapter.
        module_map: ``fn(flax_path) -> torch_module_name`` (or a dict ``{torch name: flax path}``,
            as for :func:`load_adapterhub`) where the torch names are not the Flax paths with ``.``.

    Bottlenecks and Compacters (added from a ``BnConfig``: ``seq_bn``, ``par_bn``, ...), LoRA
    (no DoRA, rsLoRA, bias or per-module ranks: AdapterHub has none), AdapterHub's IA3 (scaling
    layer outputs), AdapterHub-style prefix and prompt tuning can be written; methods AdapterHub
    lacks (VeRA, DoRA, PEFT-style prefixes and prompts, ``LinearAdapter``, ...) are an error. AdapterHub places LoRA by
    its ``attn_matrices`` / ``intermediate_lora`` / ``output_lora``, derived from BERT-like
    torch names (``attention.self.query``, ``intermediate.dense``, ``output.dense``); other
    modules are written with a warning (AdapterHub would not load them; jadapters does).

    Example:
        >>> import json, os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
        >>> x = jnp.ones((2, 4))
        >>> base = nn.Sequential([nn.Dense(4), nn.Dense(3)])
        >>> adapted = jadapters.with_adapters(base).add_adapter("a", jadapters.LoraConfig(target_modules=["layers_0"]))
        >>> variables = jadapters.init_adapters(adapted, base.init(jax.random.key(0), x), jax.random.key(1), x)
        >>> folder = tempfile.mkdtemp()
        >>> jadapters.save_adapterhub(folder, adapted, variables, module_map={"intermediate.dense": "layers_0"})
        >>> sorted(os.listdir(folder))
        ['adapter.safetensors', 'adapter_config.json']
        >>> config = json.load(open(os.path.join(folder, "adapter_config.json")))["config"]
        >>> config["architecture"], config["intermediate_lora"], config["output_lora"]
        ('lora', True, False)
    """
    to_torch = flax_to_torch(module_map)
    group = _group(adapted, name)
    if group is None:
        spec, modules = adapter_params(adapted, variables, name, "save_adapterhub")
        config, tensors = _save_one(spec, modules, to_torch)
        file_name = spec.name
    else:  # a union: each part under the union's name, AdapterHub's ConfigUnion as the config
        configs, tensors, modules = [], {}, {}
        for part in group.parts:
            spec, part_modules = adapter_params(adapted, variables, part.name, "save_adapterhub")
            part_config, part_tensors = _save_one(dataclasses.replace(spec, name=group.name), part_modules, to_torch)
            configs.append(part_config)
            tensors.update(part_tensors)
            for flax_path, leaves in part_modules.items():
                modules.setdefault(flax_path, {}).update(leaves)
        config, file_name = {"architecture": "union", "configs": configs}, group.name
    full = {"config": config, "hidden_size": _hidden_size(modules), "model_class": None, "model_name": None,
            "model_type": None, "name": file_name, "version": VERSION}
    write_dir(Path(path), CONFIG_NAME, full, WEIGHTS_NAME, tensors, "AdapterHub")


def _group(adapted: AdaptedModule, name: str | None) -> AdapterGroup | None:
    """The union ``name`` addresses (None: the model's only adapter, if that is a union), else None."""
    if not isinstance(adapted, AdaptedModule):
        return None
    if name is None:
        groups = {s.group for s in adapted.adapters}
        if len(groups) != 1 or None in groups:
            return None
        name = groups.pop()
    found = adapted.get_adapter(name) if isinstance(name, str) and name in adapted._groups() else None
    return found if isinstance(found, AdapterGroup) else None


def _save_one(spec: AdapterSpec, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    if isinstance(spec.adapter, Bottleneck):
        config, tensors = _save_bottleneck(spec, modules, to_torch)
    elif isinstance(spec.adapter, LoRA):
        config, tensors = _save_lora(spec, modules, to_torch)
    elif isinstance(spec.adapter, IA3):
        config, tensors = _save_ia3(spec, modules, to_torch)
    elif isinstance(spec.adapter, PrefixTuning):
        config, tensors = _save_prefix(spec, modules, to_torch)
    elif isinstance(spec.adapter, PromptTuning):
        config, tensors = _save_prompt(spec, modules)
    else:
        raise AdapterError(f"adapter {spec.name!r} is a {type(spec.adapter).__name__}, which AdapterHub has no "
                           "format for; save_adapterhub writes bottlenecks, Compacter, LoRA, IA3, prefix and prompt "
                           "tuning, and unions of bottleneck, LoRA and prefix tuning")
    return config, tensors


def _hidden_size(modules: dict) -> int | None:
    """The model's width as the adapter sees it most often (AdapterHub's ``hidden_size`` field)."""
    widths = [a.shape[axis] for leaves in modules.values() for leaf, a in leaves.items()
              for name, axis in (("adapter_up/bias", 0), ("adapter_up/b", 0), ("embedding", 1), ("keys", 1),
                                 ("lora_a/kernel", 0), ("lora_b/kernel", 1), ("ia3_l", 0)) if leaf == name]
    return max(set(widths), key=widths.count) if widths else None


def _method_config(spec: AdapterSpec) -> Any:
    return parse_method(spec.config) if isinstance(spec.config, str) else spec.config


def _save_bottleneck(spec: AdapterSpec, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    config = _method_config(spec)
    if not isinstance(config, BnConfig):
        raise AdapterError(f"adapter {spec.name!r}: a Bottleneck is written from the BnConfig it was added with "
                           f"(e.g. 'seq_bn'); this one was added as {config!r}")
    fields = {k: getattr(config, k) for k in _BN_FIELDS}
    fields["leave_out"] = list(config.leave_out)
    tensors = {}
    for flax_path, leaves in modules.items():
        for leaf, array in leaves.items():
            if not flax_path and leaf.startswith(SHARED + "/"):
                tensors[f"shared_parameters.{spec.name}.{leaf.split('/', 1)[1]}"] = array
                continue
            tensor, transpose = bottleneck_tensor(tuple(leaf.split("/")))
            tensors[f"{to_torch(flax_path)}.adapters.{spec.name}.{tensor}"] = _linear(spec.name, flax_path, leaf,
                                                                                      array, transpose)
    return fields, tensors


def _linear(name: str, flax_path: str, leaf: str, array: np.ndarray, transpose: bool) -> np.ndarray:
    if not transpose:
        return array
    if array.ndim != 2:
        raise AdapterError(f"adapter {name!r} at {flax_path!r}: {leaf} has shape {array.shape}; AdapterHub's format "
                           "holds 2-D Linear weights only")
    return array.T


def _lora_places(name: str, torch_names: list[str]) -> dict:
    """AdapterHub's LoRA placement fields for the adapted torch modules, or an AdapterError."""
    found, elsewhere = set(), []
    for torch_name in torch_names:
        dotted = "." + torch_name
        place = next((p for p, suffix in _LORA_PLACES.items()
                      if dotted.endswith("." + suffix) and not dotted.endswith(".attention.output.dense")), None)
        if place is None:
            elsewhere.append(torch_name)
        found.add(place)
    if elsewhere:
        warnings.warn(f"adapter {name!r}: AdapterHub's LoRA places itself on {sorted(_LORA_PLACES.values())} (by "
                      f"attn_matrices, intermediate_lora, output_lora); {sorted(elsewhere)} are none of them, so "
                      "AdapterHub will not load those tensors (load_adapterhub does)", stacklevel=3)
    matrices = [m for m in "qkv" if m in found]
    return {"selfattn_lora": bool(matrices), "attn_matrices": matrices,
            "intermediate_lora": "intermediate_lora" in found, "output_lora": "output_lora" in found}


def _lora_fields(r: int, alpha: float, dropout: float, mode: str, places: dict, init: str,
                 gated: bool = False) -> dict:
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return {"architecture": "lora", **places, "r": r, "alpha": alpha, "dropout": dropout, "composition_mode": mode,
            "init_weights": init, "init_weights_seed": None, "leave_out": [], "use_gating": gated, "use_dora": False,
            "dtype": None, "vera_b": None, "vera_d": None}


def _save_lora(spec: AdapterSpec, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    lora: LoRA = spec.adapter
    for flag, value in (("use_dora", lora.use_dora), ("use_rslora", lora.use_rslora),
                        ("bias", lora.bias != "none"), ("lora_bias", lora.lora_bias)):
        if value:
            raise AdapterError(f"adapter {spec.name!r}: AdapterHub's LoRA has no {flag}")
    tensors = {}
    for flax_path, leaves in modules.items():
        if lora.rank_and_alpha(flax_path) != (lora.rank, lora.alpha):
            raise AdapterError(f"adapter {spec.name!r} at {flax_path!r}: AdapterHub's LoRA has one rank and alpha "
                               "for all modules (no rank_pattern / alpha_pattern)")
        for leaf, array in leaves.items():
            tensor = {"lora_a/kernel": "lora_A", "lora_b/kernel": "lora_B", "gate/kernel": "gate.weight",
                      "gate/bias": "gate.bias"}.get(leaf)
            if tensor is None:
                raise AdapterError(f"adapter {spec.name!r} at {flax_path!r}: param {leaf!r} has no AdapterHub "
                                   "tensor name (only Linear layers' lora_A / lora_B and a gate)")
            tensors[f"{to_torch(flax_path)}.loras.{spec.name}.{tensor}"] = _linear(spec.name, flax_path, leaf,
                                                                                   array, leaf.endswith("kernel"))
    places = _lora_places(spec.name, [to_torch(p) for p in modules])
    return _lora_fields(lora.rank, lora.alpha, lora.dropout, "add", places, "lora", lora.use_gating), tensors


def _save_ia3(spec: AdapterSpec, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    tensors = {}
    for flax_path, leaves in modules.items():
        if spec.strategy.scales_input(flax_path):
            raise AdapterError(f"adapter {spec.name!r} at {flax_path!r}: AdapterHub's IA3 scales layer outputs; "
                               "this one scales the input (PEFT's feedforward_modules): use save_peft")
        tensors[f"{to_torch(flax_path)}.loras.{spec.name}.lora_B"] = leaves["ia3_l"].reshape(-1, 1)
    places = _lora_places(spec.name, [to_torch(p) for p in modules])
    return _lora_fields(1, 1, 0.0, "scale", places, "ia3"), tensors


def _save_prefix(spec: AdapterSpec, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    config = _method_config(spec)
    if not isinstance(config, PrefixTuningConfig) or config.style != "adapterhub":
        raise AdapterError(f"adapter {spec.name!r}: only AdapterHub-style prefix tuning (style='adapterhub') has "
                           "AdapterHub's semantics")
    root = f"prefix_tuning.prefix_tunings.{spec.name}.self_prefix."
    gates = {}
    for flax_path in modules:
        for leaf in [leaf for leaf in modules[flax_path] if leaf.startswith("gate/")]:
            tensor = "weight" if leaf == "gate/kernel" else "bias"
            gates[f"{to_torch(flax_path)}.prefix_tuning.prefix_gates.{spec.name}.{tensor}"] = _linear(
                spec.name, flax_path, leaf, modules[flax_path][leaf], tensor == "weight")
    layers = [{k: v for k, v in modules[p].items() if not k.startswith("gate/")}
              for p in sorted(modules, key=_natural)]
    if spec.adapter.projection:
        first = layers[0]
        for leaf in ("embedding", "down/kernel", "down/bias"):
            if any(not np.array_equal(layer[leaf], first[leaf]) for layer in layers):
                raise AdapterError(f"adapter {spec.name!r}: its layers' {leaf!r} differ; AdapterHub shares the "
                                   "prefix embedding and first Linear across layers")
        tensors = {root + "wte.weight": first["embedding"], root + "control_trans.0.weight": first["down/kernel"].T,
                   root + "control_trans.0.bias": first["down/bias"],
                   root + "control_trans.2.weight": np.concatenate([layer["up/kernel"].T for layer in layers]),
                   root + "control_trans.2.bias": np.concatenate([layer["up/bias"] for layer in layers])}
    else:
        kv = np.stack([a for layer in layers for a in (layer["keys"], layer["values"])], axis=1)
        tensors = {root + "control_trans": kv.reshape(-1)}
    adapter = spec.adapter
    fields = {"architecture": "prefix_tuning", "prefix_length": adapter.length, "flat": not adapter.projection,
              "bottleneck_size": adapter.hidden or 512, "non_linearity": adapter.non_linearity,
              "dropout": adapter.dropout, "cross_prefix": config.cross_prefix, "encoder_prefix": True,
              "leave_out": [], "use_gating": adapter.use_gating, "shared_gating": adapter.shared_gating,
              "init_weights_seed": None}
    return fields, {**tensors, **gates}


def _save_prompt(spec: AdapterSpec, modules: dict) -> tuple[dict, dict]:
    config = _method_config(spec)
    if not isinstance(config, PromptTuningConfig) or config.style != "adapterhub":
        raise AdapterError(f"adapter {spec.name!r}: only AdapterHub-style prompt tuning (style='adapterhub') has "
                           "AdapterHub's semantics")
    (leaves,) = modules.values()
    prompts = leaves["embedding"]
    fields = {"architecture": "prompt_tuning", "prompt_length": int(prompts.shape[0]), "prompt_init": "random_uniform",
              "prompt_init_text": None, "combine": config.combine, "init_weights_seed": None}
    return fields, {f"prompt_tuning.prompt_tunings.{spec.name}.prompt_embedding.weight": prompts}

