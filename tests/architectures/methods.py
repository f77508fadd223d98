"""The adapter methods of the architecture matrix, one small class each (AdapterHub's test design).

A :class:`Method` knows where its adapters go on a family (through the
family's roles) and how to configure two of them, ``variant`` 0 and 1, so the
matrix can enable one and disable the other. Adding a method to the matrix is
adding a subclass to :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses

import jadapters
from jadapters import AdaptedModule

from architectures import families as own
from architectures.zoo import Family


@dataclasses.dataclass(frozen=True)
class Method:
    name: str = "method"
    #: Leaves whose gradient is zero by construction (they may or may not move in training).
    gradient_free: tuple[str, ...] = ()

    def applies(self, family: Family) -> bool:
        return True

    def add(self, adapted: AdaptedModule, family: Family, name: str, variant: int) -> AdaptedModule:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class LinearAdapterMethod(Method):
    """NeMo's LinearAdapter, as a global adapter (the family's global roles)."""

    name: str = "linear"

    def add(self, adapted, family, name, variant):
        adapter = jadapters.LinearAdapter(dim=4, norm_position="pre") if variant == 0 else jadapters.LinearAdapter(
            dim=3, norm_position="post", activation="relu"
        )
        return adapted.add_adapter(name, adapter)


@dataclasses.dataclass(frozen=True)
class MHAAdapterMethod(Method):
    """NeMo's MultiHeadAttentionAdapter on sequence outputs, reading the family's mask where it has one."""

    name: str = "mha"
    # A key bias shifts every score of a query by the same amount: softmax ignores it.
    gradient_free: tuple[str, ...] = ("['linear_k']['bias']",)

    def applies(self, family):
        return family.mha is not None

    def add(self, adapted, family, name, variant):
        role, mask = family.mha
        adapter = jadapters.MultiHeadAttentionAdapter(n_head=2, n_feat=own.D, proj_dim=8 if variant == 0 else None)
        return adapted.add_adapter(f"{role}:{name}", adapter, strategy=jadapters.MHAResidualAdd(mask_argument=mask))


@dataclasses.dataclass(frozen=True)
class LoRAMethod(Method):
    """LoRA on the family's LoRA roles (Dense, multi-head DenseGeneral, Conv, Embed, GPT-2's Conv1D)."""

    name: str = "lora"

    def add(self, adapted, family, name, variant):
        lora = jadapters.LoRA(rank=4, alpha=8.0) if variant == 0 else jadapters.LoRA(rank=2, alpha=4.0)
        return adapted.add_adapter(f"{'+'.join(family.lora_roles)}:{name}", lora)


METHODS = (LinearAdapterMethod(), MHAAdapterMethod(), LoRAMethod())
