"""PEFT's adapter format in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`load_peft` reads an adapter saved by Hugging Face PEFT (LoRA with its
variants rsLoRA, DoRA, rank/alpha patterns, ``bias="lora_only"`` and
``lora_bias``; IA3; VeRA with saved projections; prompt tuning) onto a Flax
model; :func:`save_peft` writes one of jadapters' adapters of those methods in
PEFT's format, so that ``PeftModel.from_pretrained`` loads it.

The name rule: PEFT's tensor ``base_model.model.<torch module>.<tensor>`` is
the Flax module ``<torch module>`` with ``.`` replaced by ``/`` (Hugging Face's
Flax models use the torch names), e.g. ``encoder.layer.0.attention.self.query``
-> ``encoder/layer/0/attention/self/query``. A model of your own passes
``module_map``: ``fn(torch_module_name) -> flax_path`` (or a dict) to
:func:`load_peft`, and the inverse ``fn(flax_path) -> torch_module_name`` (or
the same dict) to :func:`save_peft`. Tensors change to torch's layout: a Linear
``weight`` is ``(out, in)``, a Flax kernel ``(in, out)``:

==========================  ==================================  =========
PEFT tensor                 jadapters param                     layout
==========================  ==================================  =========
``lora_A.weight`` (r, in)   ``lora_a/kernel`` (in, r)           transpose
``lora_B.weight`` (out, r)  ``lora_b/kernel`` (r, out)          transpose
``lora_B.bias``             ``lora_b/bias``
``lora_magnitude_vector``   ``lora_magnitude``
``base_layer.bias``         ``bias`` (``bias="lora_only"``)
``lora_embedding_A/B``      ``lora_embedding_a/b``              transpose
``ia3_l`` (out, 1)/(1, in)  ``ia3_l`` (n,)                      ravel
``vera_lambda_b/d``         ``vera_lambda_b/d``
``base_model.vera_A/B``     ``vera_projection`` collection      sliced per layer, transposed
``prompt_embeddings``       ``embedding`` (the prompt adapter)
==========================  ==================================  =========

The adapter is placed exactly on the modules the file holds tensors for.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jadapters.adapters.ia3 import IA3, IA3Config
from jadapters.adapters.lora import LoRA, LoraConfig
from jadapters.adapters.prompt import PromptTuning, PromptTuningConfig
from jadapters.adapters.vera import VERA_COLLECTION, VeRA, VeraConfig, vera_projection
from jadapters.errors import AdapterError
from jadapters.interop import (ModuleMap, adapter_params, add_and_init, fill_params, flax_to_torch, has_module,
                                read_dir, torch_to_flax, write_dir)
from jadapters.transform import AdaptedModule
from jadapters.tree import ADAPTERS_KEY, merge_trees, split_adapters

__all__ = ["load_peft", "save_peft", "CONFIG_NAME", "WEIGHTS_NAME", "PEFT_TENSORS"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"

#: PEFT's tensor suffix -> (jadapters' leaf under the adapter, torch -> Flax layout).
PEFT_TENSORS: dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray] | None]] = {
    "lora_A.weight": (("lora_a", "kernel"), np.transpose),
    "lora_B.weight": (("lora_b", "kernel"), np.transpose),
    "lora_B.bias": (("lora_b", "bias"), None),
    "lora_magnitude_vector": (("lora_magnitude",), None),
    "base_layer.bias": (("bias",), None),
    "lora_embedding_A": (("lora_embedding_a",), np.transpose),
    "lora_embedding_B": (("lora_embedding_b",), np.transpose),
    "ia3_l": (("ia3_l",), np.ravel),
    "vera_lambda_b": (("vera_lambda_b",), None),
    "vera_lambda_d": (("vera_lambda_d",), None),
}
_LEAVES = {leaf: suffix for suffix, (leaf, _) in PEFT_TENSORS.items()}

#: The config fields PEFT 0.21 writes, per peft_type; others are warned about and ignored.
_COMMON = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
           "inference_mode", "modules_to_save"}
_KNOWN = {
    "LORA": _COMMON | {
        "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "lora_bias", "rank_pattern",
        "alpha_pattern", "target_modules", "init_lora_weights", "fan_in_fan_out", "exclude_modules",
        "layers_to_transform", "layers_pattern", "layer_replication", "megatron_config", "megatron_core",
        "loftq_config", "eva_config", "corda_config", "trainable_token_indices", "use_qalora", "qalora_group_size",
        "target_parameters", "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "kasa_config",
        "lora_ga_config", "monteclora_config", "use_bdlora", "velora_config"},
    "IA3": _COMMON | {"target_modules", "feedforward_modules", "fan_in_fan_out", "exclude_modules",
                      "init_ia3_weights"},
    "VERA": _COMMON | {"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                       "bias", "fan_in_fan_out", "init_weights", "layers_to_transform", "layers_pattern"},
    "PROMPT_TUNING": _COMMON | {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
                                "tokenizer_name_or_path", "tokenizer_kwargs"},
}

# ---------------------------------------------------------------------------------------------- loading


def load_peft(
    path: str | Path,
    model: Any,
    variables: Mapping[str, Any],
    *inputs: Any,
    adapter_name: str = "default",
    module_map: ModuleMap = None,
    **kwargs: Any,
) -> tuple[AdaptedModule, dict]:
    """Loads an adapter saved by PEFT (``save_pretrained``) onto a Flax model.

    Args:
        path: PEFT's adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
        model: a plain Flax model (e.g. a Hugging Face Flax model's ``.module``) or an
            :class:`jadapters.AdaptedModule`, to which the adapter is added.
        variables: the model's variables, ``{'params': ...}`` (with its other adapters, if any).
        *inputs: sample inputs, as for :func:`jadapters.init_adapters` (``**kwargs`` too).
        adapter_name: the adapter's name in jadapters.
        module_map: ``fn(torch_module_name) -> flax_path`` (or a dict) where the model's Flax
            paths are not its torch names with ``/`` for ``.`` (see the module docstring).

    Returns:
        ``(adapted, variables)``: the model with the adapter and new variables holding the
        file's arrays (``variables`` passed in is unchanged).

    Supported ``peft_type``: ``LORA`` (``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``,
    ``rank_pattern``, ``alpha_pattern``, ``lora_dropout``, ``bias``, ``lora_bias``), ``IA3``
    (``feedforward_modules``), ``VERA`` (saved with ``save_projection=True``: torch's generator
    cannot be reproduced) and ``PROMPT_TUNING``. Config fields jadapters does not know (a newer
    PEFT) are ignored with a warning.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
        >>> x = jnp.ones((2, 4))
        >>> base = nn.Sequential([nn.Dense(4), nn.Dense(3)])
        >>> params = base.init(jax.random.key(0), x)
        >>> adapted = jadapters.with_adapters(base).add_adapter(
        ...     "a", jadapters.LoraConfig(r=2, target_modules=["layers_1"], init_lora_weights=False))
        >>> variables = jadapters.init_adapters(adapted, params, jax.random.key(1), x)
        >>> folder = tempfile.mkdtemp()
        >>> jadapters.save_peft(folder, adapted, variables)
        >>> loaded, new = jadapters.load_peft(folder, base, params, x)
        >>> bool(jnp.allclose(loaded.apply(new, x), adapted.apply(variables, x)))
        True
    """
    path = Path(path)
    config, tensors = read_dir(path, CONFIG_NAME, WEIGHTS_NAME, "PEFT")
    peft_type = config.get("peft_type")
    if peft_type not in _KNOWN:
        raise AdapterError(f"{path / CONFIG_NAME}: peft_type {peft_type!r} is not supported; jadapters loads "
                           f"{sorted(_KNOWN)}")
    unknown = sorted(set(config) - _KNOWN[peft_type])
    if unknown:
        warnings.warn(f"{path / CONFIG_NAME}: ignoring config field(s) jadapters does not know: {unknown}",
                      stacklevel=2)
    to_flax = torch_to_flax(module_map)
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}

    if peft_type == "PROMPT_TUNING":
        if "prompt_embeddings" not in tensors:
            raise AdapterError(f"{path / WEIGHTS_NAME}: prompt tuning expects the tensor 'prompt_embeddings', "
                               f"the file has {sorted(tensors)}")
        length = config.get("num_virtual_tokens")
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise AdapterError(f"{path / CONFIG_NAME}: prompt tuning expects num_virtual_tokens, a positive int, "
                               f"got {length!r}")
        method = PromptTuningConfig(num_virtual_tokens=length)
        wanted, placed = {}, []  # filled in below: the prompt sits where the model's embedding site puts it
    else:
        modules = _modules(path, tensors, to_flax, params)
        method = _method_config(path, peft_type, config, modules)
        wanted = {}
        for torch_name, (flax_path, found) in modules.items():
            for suffix, array in found.items():
                leaf, transform = PEFT_TENSORS[suffix]
                key = tuple(flax_path.split("/")) + (ADAPTERS_KEY, adapter_name) + leaf
                wanted[key] = (f"{PREFIX}{torch_name}.{suffix}", flax_path, transform(array) if transform else array)
        placed = [flax_path for flax_path, _ in modules.values()]

    adapted, new, rest = add_and_init(model, adapter_name, method, variables, *inputs, **kwargs)
    if peft_type == "PROMPT_TUNING":
        prompts = np.asarray(tensors["prompt_embeddings"])
        for key in (k for k in traverse_util.flatten_dict(new.get("params", {})) if k[-1] == "embedding"):
            wanted[key] = ("prompt_embeddings", "/".join(key[: key.index(ADAPTERS_KEY)]), prompts)
    new = fill_params(path / WEIGHTS_NAME, new, wanted, adapter_name,
                      f"check the config: {peft_type} with {_flags(config)}")
    if peft_type == "VERA":
        new = {**new, VERA_COLLECTION: _vera_projections(path, tensors, new, adapter_name, placed)}
    return adapted, merge_trees(rest, new)


def _modules(path: Path, tensors: Mapping[str, np.ndarray], to_flax: Callable[[str], str],
             params: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """torch module name -> (Flax path, {PEFT suffix: array}); every module must be in the model."""
    modules: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    for key in sorted(tensors):
        if key in (VERA_A, VERA_B):
            continue
        suffix = next((s for s in PEFT_TENSORS if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise AdapterError(f"{path / WEIGHTS_NAME}: tensor {key!r} is not supported; expected "
                               f"'{PREFIX}<module>.<tensor>' with a tensor among {sorted(PEFT_TENSORS)}")
        torch_name = key[len(PREFIX): -len(suffix) - 1]
        if torch_name not in modules:
            flax_path = to_flax(torch_name)
            if not has_module(params, flax_path):
                raise AdapterError(f"{path / WEIGHTS_NAME}: target module {torch_name!r} (Flax path {flax_path!r}) "
                                   "is absent from the model's params; pass module_map if its Flax names differ")
            modules[torch_name] = (flax_path, {})
        modules[torch_name][1][suffix] = np.asarray(tensors[key])
    if not modules:
        raise AdapterError(f"{path / WEIGHTS_NAME}: no adapter tensors in the file")
    return modules


def _module_params(variables: Mapping[str, Any], flax_path: str) -> Mapping[str, Any]:
    node: Any = variables.get("params", {})
    for part in flax_path.split("/"):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def _peft_matches(name: str, entries: Any) -> bool:
    """PEFT's target rule: a string is a full regex match, a list entry matches the name or its ``.``-suffix."""
    if entries is None:
        return False
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name == e or name.endswith("." + e) for e in entries)


def _by_peft_pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _method_config(path: Path, peft_type: str, config: dict, modules: dict) -> Any:
    paths = tuple(flax_path for flax_path, _ in modules.values())
    try:
        if peft_type == "LORA":
            r, alpha = int(config.get("r", 8)), config.get("lora_alpha", 8)
            # PEFT's patterns resolved on the torch names, restated per Flax path (exact, whatever module_map does).
            rank_pattern, alpha_pattern = [], []
            for torch_name, (flax_path, _) in modules.items():
                exact = re.escape(flax_path)
                if (rank := _by_peft_pattern(config.get("rank_pattern"), torch_name, r)) != r:
                    rank_pattern.append((exact, int(rank)))
                if (a := _by_peft_pattern(config.get("alpha_pattern"), torch_name, alpha)) != alpha:
                    alpha_pattern.append((exact, a))
            return LoraConfig(
                r=r, lora_alpha=alpha, target_modules=paths, lora_dropout=float(config.get("lora_dropout") or 0.0),
                use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
                bias=config.get("bias") or "none", lora_bias=bool(config.get("lora_bias")),
                rank_pattern=tuple(rank_pattern), alpha_pattern=tuple(alpha_pattern),
            )
        if peft_type == "IA3":
            feedforward = tuple(p for name, (p, _) in modules.items()
                                if _peft_matches(name, config.get("feedforward_modules")))
            return IA3Config(target_modules=paths, feedforward_modules=feedforward)
        if peft_type == "VERA":
            return VeraConfig(r=int(config.get("r", 256)), target_modules=paths,
                              projection_prng_key=int(config.get("projection_prng_key") or 0), save_projection=True,
                              vera_dropout=float(config.get("vera_dropout") or 0.0),
                              d_initial=float(config.get("d_initial", 0.1)))
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path / CONFIG_NAME}: {peft_type} config not supported: {e}") from None
    raise AssertionError(peft_type)


def _vera_projections(path: Path, tensors: Mapping[str, np.ndarray], new: Mapping[str, Any], name: str,
                      placed: list[str]) -> dict:
    """PEFT's shared ``vera_A`` (r, max in) / ``vera_B`` (max out, r), sliced per layer, in Flax layout."""
    if VERA_A not in tensors or VERA_B not in tensors:
        raise AdapterError(f"{path / WEIGHTS_NAME}: a VeRA adapter needs {VERA_A!r} and {VERA_B!r} (PEFT's "
                           "save_projection=True): torch's generator cannot be reproduced from projection_prng_key")
    a_all, b_all = np.asarray(tensors[VERA_A]), np.asarray(tensors[VERA_B])
    flat = traverse_util.flatten_dict(new.get(VERA_COLLECTION, {}))
    for flax_path in placed:
        at = tuple(flax_path.split("/")) + (ADAPTERS_KEY, name)
        n_in, rank = flat[at + ("vera_a",)].shape
        n_out = flat[at + ("vera_b",)].shape[1]
        if a_all.shape[0] != rank or b_all.shape[1] != rank or a_all.shape[1] < n_in or b_all.shape[0] < n_out:
            raise AdapterError(f"{path / WEIGHTS_NAME}: VeRA projections {VERA_A} {a_all.shape} / {VERA_B} "
                               f"{b_all.shape} do not cover the layer at {flax_path!r} (in {n_in}, out {n_out}, "
                               f"rank {rank})")
        flat[at + ("vera_a",)] = jax.numpy.asarray(a_all[:, :n_in].T)
        flat[at + ("vera_b",)] = jax.numpy.asarray(b_all[:n_out, :].T)
    return traverse_util.unflatten_dict(flat)


def _flags(config: Mapping[str, Any]) -> dict:
    return {k: config[k] for k in ("use_dora", "bias", "lora_bias") if k in config}


# ---------------------------------------------------------------------------------------------- saving


def save_peft(
    path: str | Path,
    adapted: AdaptedModule,
    variables: Mapping[str, Any],
    name: str | None = None,
    base_model_name_or_path: str | None = None,
    module_map: ModuleMap = None,
) -> None:
    """Writes one adapter in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Args:
        path: the directory (created if needed).
        adapted: the adapted model.
        variables: its variables.
        name: the adapter to write; None: the model's only adapter.
        base_model_name_or_path: written to the config (PEFT's field).
        module_map: ``fn(flax_path) -> torch_module_name`` (or a dict ``{torch name: flax path}``,
            as for :func:`load_peft`) where the torch names are not the Flax paths with ``.``.

    LoRA (rsLoRA, DoRA, patterns, ``bias="lora_only"``, ``lora_bias``) on dense layers and
    embeddings, IA3, VeRA and PEFT-style prompt tuning can be written; other methods
    (bottlenecks, ``LinearAdapter``, ...) have no PEFT format and are an error.

    Example:
        >>> import json, os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
        >>> x = jnp.ones((2, 4))
        >>> base = nn.Sequential([nn.Dense(4), nn.Dense(3)])
        >>> adapted = jadapters.with_adapters(base).add_adapter("a", jadapters.IA3Config(target_modules=["layers_0"]))
        >>> variables = jadapters.init_adapters(adapted, base.init(jax.random.key(0), x), jax.random.key(1), x)
        >>> folder = tempfile.mkdtemp()
        >>> jadapters.save_peft(folder, adapted, variables)
        >>> sorted(os.listdir(folder))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> json.load(open(os.path.join(folder, "adapter_config.json")))["peft_type"]
        'IA3'
    """
    spec, modules = adapter_params(adapted, variables, name, "save_peft")
    adapter = spec.adapter
    to_torch = flax_to_torch(module_map)

    if isinstance(adapter, LoRA):
        config, tensors = _save_lora(adapter, spec.name, modules, to_torch)
    elif isinstance(adapter, IA3):
        config, tensors = _save_ia3(spec, modules, to_torch)
    elif isinstance(adapter, VeRA):
        config, tensors = _save_vera(adapter, spec.name, modules, variables, to_torch)
    elif isinstance(adapter, PromptTuning):
        config, tensors = _save_prompt(spec, modules)
    else:
        raise AdapterError(f"adapter {spec.name!r} is a {type(adapter).__name__}, which PEFT has no format for; "
                           "save_peft writes LoRA (and its variants), IA3, VeRA and prompt tuning")
    config = {"base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
              "modules_to_save": None, **config}
    write_dir(Path(path), CONFIG_NAME, config, WEIGHTS_NAME, tensors, "PEFT")


def _layout(name: str, flax_path: str, leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf.endswith("kernel") or leaf.startswith("lora_embedding"):
        if array.ndim != 2:
            raise AdapterError(f"adapter {name!r} at {flax_path!r}: {leaf} has shape {array.shape}; PEFT's format "
                               "holds 2-D Linear/Embedding weights only (not Conv or multi-axis DenseGeneral)")
        return array.T
    return array


def _tensor_key(name: str, flax_path: str, leaf: str, to_torch: Callable[[str], str]) -> str:
    if leaf not in {"/".join(k) for k in _LEAVES}:
        raise AdapterError(f"adapter {name!r} at {flax_path!r}: param {leaf!r} has no PEFT tensor name")
    return f"{PREFIX}{to_torch(flax_path)}.{_LEAVES[tuple(leaf.split('/'))]}"


def _save_lora(lora: LoRA, name: str, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    tensors, ranks, alphas = {}, {}, {}
    for flax_path, leaves in modules.items():
        torch_name = to_torch(flax_path)
        rank, alpha = lora.rank_and_alpha(flax_path)
        if rank != lora.rank:
            ranks[torch_name] = rank
        if alpha != lora.alpha:
            alphas[torch_name] = alpha
        for leaf, array in leaves.items():
            tensors[_tensor_key(name, flax_path, leaf, to_torch)] = _layout(name, flax_path, leaf, array)
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "peft_type": "LORA", "task_type": None, "r": lora.rank, "lora_alpha": alpha,
        "target_modules": sorted(to_torch(p) for p in modules), "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora, "use_dora": lora.use_dora, "bias": lora.bias, "lora_bias": lora.lora_bias,
        "rank_pattern": ranks, "alpha_pattern": alphas, "init_lora_weights": True, "fan_in_fan_out": False,
        "layers_to_transform": None, "layers_pattern": None,
    }
    return config, tensors


def _save_ia3(spec: Any, modules: dict, to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    tensors, feedforward = {}, []
    for flax_path, leaves in modules.items():
        scales_input = spec.strategy.scales_input(flax_path)
        if scales_input:
            feedforward.append(to_torch(flax_path))
        for leaf, array in leaves.items():
            key = _tensor_key(spec.name, flax_path, leaf, to_torch)
            tensors[key] = array.reshape((1, -1) if scales_input else (-1, 1))
    config = {"peft_type": "IA3", "task_type": None, "target_modules": sorted(to_torch(p) for p in modules),
              "feedforward_modules": sorted(feedforward), "fan_in_fan_out": False, "init_ia3_weights": True}
    return config, tensors


def _save_vera(vera: VeRA, name: str, modules: dict, variables: Mapping,
               to_torch: Callable[[str], str]) -> tuple[dict, dict]:
    tensors = {}
    for flax_path, leaves in modules.items():
        for leaf, array in leaves.items():
            tensors[_tensor_key(name, flax_path, leaf, to_torch)] = array
    projections = traverse_util.flatten_dict(split_adapters({VERA_COLLECTION: variables.get(VERA_COLLECTION, {})},
                                                            [name])[0].get(VERA_COLLECTION, {}))
    per_layer = []
    for flax_path in modules:
        at = tuple(flax_path.split("/")) + (ADAPTERS_KEY, name)
        if at + ("vera_a",) in projections:
            a, b = projections[at + ("vera_a",)], projections[at + ("vera_b",)]
        else:  # not stored (save_projection=False): regenerated from the seed, as the adapter does
            kernel = _module_params(variables, flax_path).get("kernel")
            if kernel is None or np.ndim(kernel) != 2:
                raise AdapterError(f"adapter {name!r} at {flax_path!r}: VeRA's projections are not stored and the "
                                   "layer has no 2-D kernel to size them from")
            a, b = vera_projection(vera.projection_prng_key, vera.rank, kernel.shape[0], kernel.shape[1])
        per_layer.append((flax_path, np.asarray(a).T, np.asarray(b).T))
    # PEFT keeps one A (r, max in) and one B (max out, r) and slices them per layer.
    a_all = max((a for _, a, _ in per_layer), key=lambda a: a.shape[1])
    b_all = max((b for _, _, b in per_layer), key=lambda b: b.shape[0])
    for flax_path, a, b in per_layer:
        if not (np.array_equal(a, a_all[:, : a.shape[1]]) and np.array_equal(b, b_all[: b.shape[0]])):
            raise AdapterError(f"adapter {name!r} at {flax_path!r}: its VeRA projections are not slices of the "
                               "largest layer's, as PEFT's shared vera_A / vera_B must be (jadapters scales A by "
                               "each layer's input width: layers of different input widths cannot be written)")
    tensors[VERA_A], tensors[VERA_B] = a_all, b_all
    config = {"peft_type": "VERA", "task_type": None, "r": vera.rank, "target_modules": sorted(to_torch(p) for p in modules),
              "projection_prng_key": vera.projection_prng_key, "save_projection": True, "vera_dropout": vera.dropout,
              "d_initial": vera.d_initial, "bias": "none", "fan_in_fan_out": False, "init_weights": True}
    return config, tensors


def _save_prompt(spec: Any, modules: dict) -> tuple[dict, dict]:
    if getattr(spec.config, "style", "peft") != "peft":
        raise AdapterError(f"adapter {spec.name!r}: only PEFT-style prompt tuning (style='peft') has PEFT's "
                           f"semantics; this one is style={spec.config.style!r}")
    (leaves,) = modules.values()
    prompts = leaves["embedding"]
    config = {"peft_type": "PROMPT_TUNING", "task_type": "FEATURE_EXTRACTION",
              "num_virtual_tokens": int(prompts.shape[0]), "token_dim": int(prompts.shape[1]),
              "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
              "tokenizer_kwargs": None}
    return config, {"prompt_embeddings": prompts}
