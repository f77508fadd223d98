"""What the other libraries' adapter formats share: reading and writing their directories, torch module names.

PEFT's format (:mod:`jadapters.peft_format`) and AdapterHub's
(:mod:`jadapters.adapterhub_format`) both hold a JSON config and a safetensors
file of tensors named after the torch model's modules, which Hugging Face's
Flax models name alike with ``/`` for ``.``. A loader lists the arrays it wants
per Flax param (:func:`fill_params` checks them against what the adapter
creates); a saver starts from :func:`adapter_params`.

Example:
    >>> to_flax = torch_to_flax(None)
    >>> to_flax("encoder.layer.0.output")
    'encoder/layer/0/output'
    >>> flax_to_torch({"blocks.0.mlp": "block_0/mlp"})("block_0/mlp")
    'blocks.0.mlp'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jadapters.errors import AdapterError
from jadapters.transform import AdaptedModule, AdapterSpec, init_adapters, with_adapters
from jadapters.tree import ADAPTERS_KEY, split_adapters

__all__ = ["ModuleMap", "torch_to_flax", "flax_to_torch", "has_module", "read_dir", "write_dir", "add_and_init",
           "fill_params", "adapter_params"]

ModuleMap = Callable[[str], str] | Mapping[str, str] | None

#: Hugging Face Flax module classes -> the shipped preset that knows their sites.
_HF_PRESETS = (("FlaxBert", "hf_bert"), ("FlaxGPT2", "hf_gpt2"), ("FlaxT5", "hf_t5"), ("FlaxViT", "hf_vit"))

#: One wanted array: (the file's tensor name, the Flax module path, the array in Flax layout).
Wanted = dict[tuple[str, ...], tuple[str, str, np.ndarray]]


def torch_to_flax(module_map: ModuleMap) -> Callable[[str], str]:
    """``fn(torch module name) -> Flax path``: ``module_map`` or ``.`` -> ``/``."""
    if module_map is None:
        return lambda torch_name: torch_name.replace(".", "/")
    if isinstance(module_map, Mapping):
        return lambda torch_name: module_map.get(torch_name, torch_name.replace(".", "/"))
    return module_map


def flax_to_torch(module_map: ModuleMap) -> Callable[[str], str]:
    """``fn(Flax path) -> torch module name``: ``module_map`` (a dict is inverted) or ``/`` -> ``.``."""
    if module_map is None:
        return lambda flax_path: flax_path.replace("/", ".")
    if isinstance(module_map, Mapping):
        inverse = {v: k for k, v in module_map.items()}
        return lambda flax_path: inverse.get(flax_path, flax_path.replace("/", "."))
    return module_map


def has_module(params: Mapping[str, Any], flax_path: str) -> bool:
    """Whether ``params`` holds a module (a dict) at ``flax_path``."""
    node: Any = params
    for part in flax_path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return isinstance(node, Mapping)


def read_dir(path: Path, config_name: str, weights_name: str, library: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {tensor name: array})`` of an adapter directory, or an AdapterError naming the file."""
    config_file, weights_file = path / config_name, path / weights_name
    for file in (config_file, weights_file):
        if not file.is_file():
            raise AdapterError(f"{path}: expected {library}'s adapter directory with {config_name} and "
                               f"{weights_name}; {file.name} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_file}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for corrupt headers and data
        raise AdapterError(f"{weights_file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return config, tensors


def write_dir(path: Path, config_name: str, config: dict, weights_name: str, tensors: Mapping[str, np.ndarray],
              library: str) -> None:
    """Writes the config as JSON and the tensors (torch's ``"pt"`` format metadata) as safetensors."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(arrays, str(path / weights_name), metadata={"format": "pt"})
    except OSError as e:
        raise AdapterError(f"cannot write {library}'s adapter to {str(path)!r}: {e}") from None


def add_and_init(model: Any, name: str, method: Any, variables: Mapping[str, Any], *inputs: Any,
                 **kwargs: Any) -> tuple[AdaptedModule, dict, dict]:
    """``(adapted, the new adapter's variables, the others)``; a Hugging Face model gets its preset."""
    if isinstance(model, AdaptedModule):
        adapted = model
    else:
        kind = type(model).__name__
        preset = next((preset for prefix, preset in _HF_PRESETS if kind.startswith(prefix)), None)
        adapted = with_adapters(model, preset)
    adapted = adapted.add_adapter(name, method)
    created = init_adapters(adapted, variables, jax.random.key(0), *inputs, **kwargs)
    new, rest = split_adapters(created, sorted(adapted._resolve_names(name)))  # a union: all its parts
    return adapted, new, rest


def fill_params(weights_file: Path, new: Mapping[str, Any], wanted: Wanted, name: str, hint: str) -> dict:
    """``new`` with its ``params`` replaced by the wanted arrays; each param must get exactly one of its shape."""
    flat = traverse_util.flatten_dict(new.get("params", {}))
    for key, (tensor, flax_path, array) in wanted.items():
        if key not in flat:
            names = sorted("/".join(k) for k in flat if name in k)
            raise AdapterError(f"{weights_file}: tensor {tensor!r} has no place in adapter {name!r} "
                               f"at {flax_path or '<root>'!r} (expected one of its params {names})")
        if tuple(flat[key].shape) != array.shape:
            raise AdapterError(f"{weights_file}: tensor {tensor!r} for the Flax param {'/'.join(key)!r} has "
                               f"shape {array.shape} (Flax layout), the model expects {tuple(flat[key].shape)}")
        flat[key] = jax.numpy.asarray(array, dtype=flat[key].dtype)
    missing = sorted("/".join(k) for k in flat if k not in wanted)
    if missing:
        raise AdapterError(f"{weights_file}: the file has no tensor for the adapter's param(s) {missing} ({hint})")
    return {**new, "params": traverse_util.unflatten_dict(flat)}


def adapter_params(adapted: AdaptedModule, variables: Mapping[str, Any], name: str | None,
                   function: str) -> tuple[AdapterSpec, dict[str, dict[str, np.ndarray]]]:
    """The adapter to save and its params as ``{Flax module path: {leaf path: array}}``."""
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"{function} expects an AdaptedModule, got {type(adapted).__name__}")
    if name is None:
        names = adapted.adapter_names()
        if len(names) != 1:
            raise AdapterError(f"{function} writes one adapter; the model has {names}: pass name=")
        name = names[0]
    spec = adapted.get_adapter(name)
    ours, _ = split_adapters(variables, [spec.name])
    flat = traverse_util.flatten_dict(ours.get("params", {}))
    if not flat:
        raise AdapterError(f"adapter {spec.name!r} has no params in the variables given to {function}")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        at = key.index(ADAPTERS_KEY)
        modules.setdefault("/".join(key[:at]), {})["/".join(key[at + 2:])] = np.asarray(value)
    return spec, modules
