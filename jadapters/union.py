"""Unions of methods under one adapter name: AdapterHub's ``ConfigUnion``, ``"mam"`` and ``"unipelt"``.

``adapted.add_adapter("u", UniPELTConfig())`` (or ``"unipelt"``) adds one
ordinary adapter per part, named ``"u.<part>"`` (``u.prefix_tuning``,
``u.adapter``, ``u.lora``), each with its own spec, params and strategy, and
grouped under ``"u"`` (:attr:`jadapters.AdapterSpec.group`). The group name
addresses them together wherever a model takes adapter names:
``set_enabled_adapters("u")``, ``remove_adapter("u")``, ``get_adapter("u")``
(a :class:`jadapters.transform.AdapterGroup`), ``save_adapters(..., name="u")``,
``load_adapters(..., name="u")``, ``merge_adapters`` (which refuses what cannot
merge, e.g. a gated LoRA); a part is addressed by its own name.

The configs (AdapterHub 1.3's defaults):

* :class:`MAMConfig` (``"mam"``, He et al.'s Mix-And-Match): AdapterHub-style
  prefix tuning with ``bottleneck_size=800`` (length 30) + ``par_bn``;
* :class:`UniPELTConfig` (``"unipelt"``, Mao et al.): prefix tuning (length
  10, bottleneck 512) + ``seq_bn`` (reduction factor 16) + LoRA (r 8, alpha 2,
  on the query and value projections), every part with ``use_gating=True``;
* :class:`ConfigUnion` ``(*configs)``: any methods together.

Bracket overrides apply a field to every part that has it
(``"unipelt[r=4]"``), or to one part with its name (``"mam[adapter.reduction_factor=4]"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jadapters.adapters.bottleneck import BnConfig, ParBnConfig, SeqBnConfig
from jadapters.adapters.lora import LoraConfig
from jadapters.adapters.prefix import PrefixTuningConfig
from jadapters.configs import MethodConfig, PlacedPart, register_method
from jadapters.errors import AdapterError

#: Separates a union's name from its parts' names: ``"u.lora"``.
PART_SEPARATOR = "."
_PART_NAMES = {"bottleneck": "adapter"}  # AdapterHub's name for a union's bottleneck part


def architecture(config: MethodConfig) -> str:
    """AdapterHub's ``architecture`` of a config: ``'bottleneck'`` for every ``BnConfig``, else the method name."""
    return "bottleneck" if isinstance(config, BnConfig) else config.method


def _fields(config: MethodConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


@dataclasses.dataclass(frozen=True, init=False)
class ConfigUnion(MethodConfig):
    """Several methods as one adapter: ``ConfigUnion(config, config, ...)``.

    Each part places itself as its method does (explicit targets are not
    taken) and becomes an adapter named ``name + '.' + part``, where the part
    names are :meth:`part_names` (``'adapter'`` for a bottleneck, else the
    method name; repeated ones get ``_1``, ``_2``, ...). AdapterHub's checks:
    no union inside a union; two parts of one architecture only if both are
    bottlenecks with different ``mh_adapter`` and ``output_adapter`` (or one
    of them has a ``leave_out``).

    Example:
        >>> import flax.linen as nn, jadapters
        >>> union = ConfigUnion(jadapters.LoraConfig(r=4), jadapters.SeqBnConfig())
        >>> union.part_names()
        ('lora', 'adapter')
        >>> adapted = jadapters.with_adapters(nn.Dense(4), "hf_bert").add_adapter("u", union)
        >>> adapted.adapter_names()
        ['u.lora', 'u.adapter']
        >>> adapted.set_enabled_adapters("u", False).get_enabled_adapters()
        []
        >>> ConfigUnion(jadapters.SeqBnConfig(), jadapters.ParBnConfig())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: SeqBnConfig(...) and ParBnConfig(...) cannot be combined: ...
    """

    method: ClassVar[str] = "union"
    configs: tuple[MethodConfig, ...] = ()

    def __init__(self, *configs: MethodConfig, **fields: Any) -> None:
        unknown = sorted(set(fields) - {"configs"})
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected argument(s) {unknown}")
        object.__setattr__(self, "configs", tuple(configs) + tuple(fields.get("configs") or ()))
        self._validate()

    def _validate(self) -> None:
        if not self.configs:
            raise ValueError(f"{type(self).__name__}: a union needs at least one method config")
        for config in self.configs:
            if isinstance(config, ConfigUnion):
                raise ValueError(f"{config!r} is a union of methods, which is not supported inside a union")
            if not isinstance(config, MethodConfig):
                raise ValueError(f"{config!r} is not a method config (e.g. LoraConfig(), SeqBnConfig())")
        for i, a in enumerate(self.configs):
            for b in self.configs[:i]:
                if architecture(a) != architecture(b) or getattr(a, "leave_out", ()) or getattr(b, "leave_out", ()):
                    continue
                if architecture(a) == "bottleneck":
                    if a.mh_adapter != b.mh_adapter and a.output_adapter != b.output_adapter:
                        continue
                    raise ValueError(f"{b!r} and {a!r} cannot be combined: two bottlenecks in a union must go to "
                                     "different places (mh_adapter and output_adapter both differing)")
                raise ValueError(f"{b!r} and {a!r} have the same architecture ({architecture(a)!r}) and cannot be "
                                 "combined")

    def part_names(self) -> tuple[str, ...]:
        """The parts' names, in order: the adapters are named ``name + '.' + part``."""
        names: list[str] = []
        for config in self.configs:
            base = _PART_NAMES.get(architecture(config), config.method)
            count = sum(1 for n in names if n == base or n.startswith(base + "_"))
            names.append(base if count == 0 else f"{base}_{count}")
        return tuple(names)

    def place(self, placement: Any, where: tuple[str, ...] | None = None) -> tuple[PlacedPart, ...]:
        if where is not None:
            raise AdapterError(f"method {self.method!r}: a union of methods places each part where its method goes; "
                               "give no targets or module names (add the parts separately to place them by hand)")
        parts = []
        for part, config in zip(self.part_names(), self.configs):
            try:
                parts.append(PlacedPart(part, config, config.place(placement)))
            except (AdapterError, ValueError) as e:
                raise AdapterError(f"part {part!r} ({type(config).__name__}): {e}") from None
        return tuple(parts)

    def replace(self, **changes: Any) -> "ConfigUnion":
        """A copy with ``changes`` applied to every part that has the field, or to one part as ``'part.field'``.

        Example:
            >>> MAMConfig().replace(reduction_factor=4).adapter.reduction_factor
            4
            >>> UniPELTConfig().replace(**{"lora.r": 4}).lora.r
            4
        """
        names = self.part_names()
        per_part: list[dict[str, Any]] = [{} for _ in self.configs]
        for key, value in changes.items():
            part, dot, field = key.rpartition(PART_SEPARATOR)
            if dot:
                if part not in names:
                    raise AdapterError(f"method {self.method!r} has no part {part!r} (in {key!r}); its parts: "
                                       f"{list(names)}")
                per_part[names.index(part)][field] = value
                continue
            having = [i for i, config in enumerate(self.configs) if key in _fields(config)]
            if not having:
                options = sorted(set().union(*(_fields(c) for c in self.configs)))
                raise AdapterError(f"method {self.method!r} has no option(s) [{key!r}] in any part; its options: "
                                   f"{options} (or 'part.option' with a part of {list(names)})")
            for i in having:
                per_part[i][key] = value
        configs = tuple(c.replace(**kw) if kw else c for c, kw in zip(self.configs, per_part))
        return type(self)(configs=configs)


@register_method("mam")
@dataclasses.dataclass(frozen=True, init=False)
class MAMConfig(ConfigUnion):
    """He et al.'s Mix-And-Match adapter (``"mam"``): prefix tuning (bottleneck 800) + a parallel bottleneck.

    AdapterHub's defaults: ``PrefixTuningConfig(style='adapterhub', bottleneck_size=800)``
    (length 30, reparametrised) and ``ParBnConfig()`` (factor 2, scaling 4.0), parts
    ``'prefix_tuning'`` and ``'adapter'``.

    Example:
        >>> config = MAMConfig()
        >>> config.prefix_tuning.adapter().hidden, config.adapter.reduction_factor
        (800, 2)
        >>> from jadapters.configs import parse_method
        >>> parse_method("mam[prefix_length=8]").prefix_tuning.length
        8
    """

    method: ClassVar[str] = "mam"

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None, *,
                 configs: tuple[MethodConfig, ...] | None = None) -> None:
        if configs is not None:
            if prefix_tuning is not None or adapter is not None or len(configs) != 2:
                raise TypeError("MAMConfig takes prefix_tuning and adapter, or configs=(prefix_tuning, adapter)")
            prefix_tuning, adapter = configs
        prefix_tuning = prefix_tuning or PrefixTuningConfig(style="adapterhub", bottleneck_size=800)
        adapter = adapter or ParBnConfig()
        _check_type("prefix_tuning", prefix_tuning, PrefixTuningConfig)
        _check_type("adapter", adapter, BnConfig)
        super().__init__(prefix_tuning, adapter)

    @property
    def prefix_tuning(self) -> PrefixTuningConfig:
        return self.configs[0]

    @property
    def adapter(self) -> BnConfig:
        return self.configs[1]


@register_method("unipelt")
@dataclasses.dataclass(frozen=True, init=False)
class UniPELTConfig(ConfigUnion):
    """Mao et al.'s UniPELT (``"unipelt"``): gated prefix tuning + gated ``seq_bn`` + gated LoRA.

    AdapterHub's defaults: ``PrefixTuningConfig(style='adapterhub', prefix_length=10)``
    (bottleneck 512), ``SeqBnConfig(reduction_factor=16)`` and ``LoraConfig(r=8,
    lora_alpha=2)`` (query and value), each with ``use_gating=True``, also when given:
    the gates replace LoRA's scaling, so alpha has no effect. Parts ``'prefix_tuning'``,
    ``'adapter'``, ``'lora'``.

    Example:
        >>> config = UniPELTConfig()
        >>> config.part_names(), config.lora.r, config.prefix_tuning.length
        (('prefix_tuning', 'adapter', 'lora'), 8, 10)
        >>> all(c.use_gating for c in config.configs)
        True
    """

    method: ClassVar[str] = "unipelt"

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None,
                 lora: LoraConfig | None = None, *, configs: tuple[MethodConfig, ...] | None = None) -> None:
        if configs is not None:
            if prefix_tuning is not None or adapter is not None or lora is not None or len(configs) != 3:
                raise TypeError("UniPELTConfig takes prefix_tuning, adapter and lora, or configs=(the three)")
            prefix_tuning, adapter, lora = configs
        parts = (prefix_tuning or PrefixTuningConfig(style="adapterhub", prefix_length=10),
                 adapter or SeqBnConfig(reduction_factor=16), lora or LoraConfig(r=8, lora_alpha=2))
        for field, part, cls in zip(("prefix_tuning", "adapter", "lora"), parts,
                                    (PrefixTuningConfig, BnConfig, LoraConfig)):
            _check_type(field, part, cls)
        super().__init__(*(part.replace(use_gating=True) for part in parts))

    @property
    def prefix_tuning(self) -> PrefixTuningConfig:
        return self.configs[0]

    @property
    def adapter(self) -> BnConfig:
        return self.configs[1]

    @property
    def lora(self) -> LoraConfig:
        return self.configs[2]


def _check_type(field: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise ValueError(f"{field} must be a {cls.__name__}, got {value!r}")
