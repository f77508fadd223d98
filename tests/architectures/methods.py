"""The adapter methods of the architecture matrix, one small class each (AdapterHub's test design).

A :class:`Method` knows where its adapters go on a family (through the
family's roles) and how to configure two of them, ``variant`` 0 and 1, so the
matrix can enable one and disable the other. Adding a method to the matrix is
adding a subclass to :data:`METHODS`.

Methods that are not identity at init (prompt and prefix tuning) say so with
``identity_at_init = False``; the matrix then relies on its other check of the
base (bitwise equal with the adapters disabled). A method that adds positions
to the output maps the adapted output back to the base's positions with
:meth:`Method.to_base` for the comparisons that need it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import jadapters
from jadapters import AdaptedModule
from jadapters.configs import parse_method
from jadapters.presets import ATTENTION_BLOCK, CROSS_ATTENTION_BLOCK, FFN_BLOCK

from architectures import families as own
from architectures.zoo import Family


@dataclasses.dataclass(frozen=True)
class Method:
    name: str = "method"
    #: Leaves whose gradient is zero by construction (they may or may not move in training).
    gradient_free: tuple[str, ...] = ()
    #: Whether the method folds into the base weights (the matrix then checks merge_adapters).
    mergeable: bool = False
    #: How close to the base's output the model is at init (XLA's fusions round differently).
    init_tolerance: float = 1e-6
    #: How far moved adapters must move a bfloat16 base's output (bfloat16 keeps ~3 significant digits).
    bf16_change: float = 1e-2
    #: The families of the spot checks, the bfloat16 base and mask switching (None: all). A method's
    #: dtype handling is its own, and mask switching is the core's: past the core methods, two
    #: families (scan, Hugging Face) keep the suite short.
    spot_families: tuple[str, ...] | None = ("gpt", "hf_bert")
    #: Whether the adapters start as the identity (prompts and prefixes start random, as in PEFT).
    identity_at_init: bool = True

    def applies(self, family: Family) -> bool:
        return True

    def to_base(self, output, base_output, family: Family):
        """The (primary) adapted output at the base output's positions; most methods keep them."""
        return output

    def runs_without_params(self, family: Family) -> tuple[str, ...]:
        """Module paths where adapter 'a' also runs (once per call) but keeps no params."""
        return ()

    def add(self, adapted: AdaptedModule, family: Family, name: str, variant: int) -> AdaptedModule:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class LinearAdapterMethod(Method):
    """NeMo's LinearAdapter, as a global adapter (the family's global roles)."""

    name: str = "linear"
    # It joins hidden states, whatever the layers: its dtype handling is the same on every family.
    spot_families: tuple[str, ...] | None = ("gpt", "hf_bert")

    def add(self, adapted, family, name, variant):
        adapter = jadapters.LinearAdapter(dim=4, norm_position="pre") if variant == 0 else jadapters.LinearAdapter(
            dim=3, norm_position="post", activation="relu"
        )
        return adapted.add_adapter(name, adapter)


@dataclasses.dataclass(frozen=True)
class MHAAdapterMethod(Method):
    """NeMo's MultiHeadAttentionAdapter on sequence outputs, reading the family's mask where it has one."""

    name: str = "mha"
    spot_families: tuple[str, ...] | None = ("gpt", "hf_bert")
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
    # bfloat16 on every family (each holds other layer kinds LoRA sizes itself from); mask
    # switching is the core's, checked on the spot families.
    spot_families: tuple[str, ...] | None = None
    mergeable: bool = True

    def add(self, adapted, family, name, variant):
        lora = jadapters.LoRA(rank=4, alpha=8.0) if variant == 0 else jadapters.LoRA(rank=2, alpha=4.0)
        return adapted.add_adapter(f"{'+'.join(family.lora_roles)}:{name}", lora)


@dataclasses.dataclass(frozen=True)
class DoRAMethod(Method):
    """DoRA (LoRA with a learned magnitude) on the family's LoRA roles, from its config; rsLoRA on one."""

    name: str = "dora"
    mergeable: bool = True
    # At init m == ||W|| (computed by init_adapters' program) and the forward divides by ||W|| again
    # (computed by the forward's program, whose reductions XLA may order differently): m / ||W|| is 1
    # to a float32 ulp, not exactly, and two scanned layers amplify that to ~1e-6.
    init_tolerance: float = 1e-5

    def applies(self, family):
        return family.name in LORA_VARIANT_FAMILIES

    def add(self, adapted, family, name, variant):
        config = jadapters.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=family.lora_roles,
                                      use_rslora=variant == 1)
        return adapted.add_adapter(name, config)


#: Where LoRA's variants (DoRA, IA3, VeRA) run. They join a layer as LoRA does (ParallelAdd, sized by
#: the layer), and LoRA runs on every family; these families hold every layer kind and structure
#: that sizing and merging treat apart: multi-head DenseGeneral and Embed (bert), nn.scan (gpt),
#: Conv1D's (out, in) kernel (hf_gpt2), Conv (resnet). The encoder-decoders (t5, hf_t5) hold no
#: layer kind beyond these; LoRA itself runs there. Hugging Face's BERT is the reference parity
#: tests' model (every PEFT case there). A matrix case costs seconds of compilation; the suite
#: must stay short.
LORA_VARIANT_FAMILIES = ("bert", "gpt", "hf_gpt2", "resnet")


def _declared(family: Family, roles) -> tuple[str, ...]:
    declared = dict(family.preset.roles)
    return tuple(r for r in roles if r in declared)


@dataclasses.dataclass(frozen=True)
class IA3Method(Method):
    """IA3 from its config: outputs of key/value scaled, the feed-forward output layer's input scaled;
    the family's LoRA roles (output-scaled) where it has no key, value or feed-forward output."""

    name: str = "ia3"
    mergeable: bool = True
    # Scalings of 1 +- 0.2 on a tiny Hugging Face model (initializer_range 0.02) move its output by ~2e-3.
    bf16_change: float = 1e-3

    def applies(self, family):
        # Not hf_vit: its tiny attention logits (~1e-4, initializer_range 0.02) give a key scaling a
        # gradient of ~1e-14, which Adam's epsilon turns into no change at all.
        return family.name in LORA_VARIANT_FAMILIES

    def add(self, adapted, family, name, variant):
        roles = _declared(family, ("key", "value", "ffn_output")) or family.lora_roles
        feedforward = ("ffn_output",) if "ffn_output" in roles and variant == 0 else ()
        config = jadapters.IA3Config(target_modules=roles, feedforward_modules=feedforward)
        return adapted.add_adapter(name, config)


@dataclasses.dataclass(frozen=True)
class VeRAMethod(Method):
    """VeRA (shared frozen projections from a seed) on the query and value projections (or a fused qkv)."""

    name: str = "vera"
    mergeable: bool = True

    def applies(self, family):
        return family.name in LORA_VARIANT_FAMILIES and bool(_declared(family, ("query", "value", "qkv")))

    def add(self, adapted, family, name, variant):
        roles = _declared(family, ("query", "value")) or ("qkv",)
        config = jadapters.VeraConfig(r=4 if variant == 0 else 2, target_modules=roles, projection_prng_key=variant)
        return adapted.add_adapter(name, config)



@dataclasses.dataclass(frozen=True)
class BottleneckMethod(Method):
    """An AdapterHub bottleneck method (a name with options), at every residual-block site the family declares.

    ``seq_bn`` runs on the families that declare residual-block sites but three
    (see ``applies``): post-LN blocks (BERT's),
    pre-LN ones, ``nn.scan``, an encoder-decoder with cross-attention, tuple
    outputs, one module holding two sites. The other bottleneck methods join the same way and differ in their
    options, so each runs on one family (a matrix case costs about 9 s of CPU):
    T5 with its cross-attention, ViT, and ``nn.scan(nn.remat(...))`` with
    Compacter's rule shared across the scanned layers; every option on post-
    and pre-LN blocks is in tests/test_bottleneck.py, and the outputs of each
    method against AdapterHub's in tests/test_parity_bottleneck.py.

    Variant 0 uses ``init_weights='mam_adapter'`` (zero up projection), under
    which a bottleneck starts as identity (AdapterHub's default ``'bert'`` does
    not). Compacter's PHM layers are never zero at init (rule ~ N(0,
    phm_init_range)); a small ``phm_init_range`` keeps their output within
    float rounding of zero.
    """

    name: str = "seq_bn"
    variants: tuple[str, str] = ("seq_bn", "seq_bn")
    #: The families it runs on; empty: every family with residual-block sites.
    families: tuple[str, ...] = ()

    def applies(self, family):
        if self.families:
            return family.name in self.families
        has_sites = any(site in dict(family.preset.sites) for site in (ATTENTION_BLOCK, FFN_BLOCK))
        # Not hf_bert (the AdapterHub parity tests' model), nor the own ViT and Conformer (pre-LN
        # blocks like GPT's).
        # hf_t5's tuple outputs and cross-attention blocks run under double_seq_bn.
        return has_sites and family.name not in ("vit", "conformer", "hf_bert", "hf_t5")

    def add(self, adapted, family, name, variant):
        sites = dict(family.preset.sites)
        config = parse_method(self.variants[variant]).replace(
            mh_adapter=ATTENTION_BLOCK in sites, output_adapter=FFN_BLOCK in sites,
            cross_adapter=CROSS_ATTENTION_BLOCK in sites,
        )
        return adapted.add_adapter(name, config)


BOTTLENECK_METHODS = (
    BottleneckMethod("seq_bn", variants=("seq_bn[reduction_factor=4,init_weights='mam_adapter']",
                                         "seq_bn[reduction_factor=8,use_gating=True,scaling='channel']")),
    BottleneckMethod("double_seq_bn", variants=("double_seq_bn[reduction_factor=4,init_weights='mam_adapter']",
                                                "double_seq_bn[reduction_factor=8,residual_before_ln=False]"),
                     families=("hf_t5",)),
    BottleneckMethod("par_bn", variants=("par_bn", "scaled_par_bn[reduction_factor=4]"), families=("hf_vit",)),
    BottleneckMethod("compacter", variants=("compacter[reduction_factor=4,phm_init_range=1e-8]",
                                            "compacter++[reduction_factor=2,phm_dim=2,shared_phm_rule=False]"),
                     families=("gpt",)),
)


def _sites(family):
    return dict(family.preset.sites)


@dataclasses.dataclass(frozen=True)
class PromptTuningMethod(Method):
    """Prompt tuning: PEFT's style where the family names its token embedding, else AdapterHub's;
    the other style (or a shorter prompt) for the disabled adapter. After a ViT's class token."""

    name: str = "prompt_tuning"
    identity_at_init: bool = False

    def applies(self, family):
        return "embeddings" in _sites(family)

    def config(self, family, variant):
        site = _sites(family)["embeddings"]
        styles = [s for s, ok in (("peft", site.word_embeddings), ("adapterhub", site.embeddings)) if ok]
        style = styles[variant % len(styles)]
        combine = "prefix_after_bos" if "vit" in family.name else "prefix"
        return jadapters.PromptTuningConfig(num_virtual_tokens=3 - variant, style=style, combine=combine)

    def add(self, adapted, family, name, variant):
        return adapted.add_adapter(name, self.config(family, variant))

    #: Families whose primary output is not per input position: a classifier's, T5's decoder logits.
    same_shape: tuple[str, ...] = ("vit", "hf_t5")

    def to_base(self, output, base_output, family):
        config = self.config(family, 0)
        count = config.adapter().length
        if family.name in self.same_shape:
            assert output.shape == base_output.shape, (output.shape, base_output.shape)
            return output
        assert output.shape[1] == base_output.shape[1] + count, (output.shape, base_output.shape)
        at = 0 if config.combine == "prefix" else 1
        return jnp.concatenate([output[:, :at], output[:, at + count :]], axis=1)


@dataclasses.dataclass(frozen=True)
class PrefixTuningMethod(Method):
    """Prefix tuning: PEFT's style, trained through the reparametrisation MLP (and shifting positions
    where the family has position embeddings); AdapterHub's flat prefix for the disabled adapter."""

    name: str = "prefix_tuning"
    identity_at_init: bool = False

    def applies(self, family):
        return "attention" in _sites(family)

    def add(self, adapted, family, name, variant):
        if variant == 0:
            config = jadapters.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
        else:
            config = jadapters.PrefixTuningConfig(prefix_length=2, style="adapterhub", flat=True)
        return adapted.add_adapter(name, config)

    def runs_without_params(self, family):
        site = _sites(family).get("embeddings")
        shifts = site is not None and (site.position_embeddings or site.token_type_embeddings)
        return (site.module,) if shifts else ()


@dataclasses.dataclass(frozen=True)
class UnionMethod(Method):
    """A union of methods (``mam``, ``unipelt``) under one name: its parts are adapters ``a.<part>``,
    enabled, trained, saved and loaded together. On Hugging Face's BERT only, where every part has its
    sites and AdapterHub's parity tests run (tests/test_union.py); each part's method is in the matrix."""

    name: str = "unipelt"
    variants: tuple[str, str] = ("unipelt", "unipelt")
    identity_at_init: bool = False  # the prefix starts random
    spot_families: tuple[str, ...] | None = ("hf_bert",)

    def applies(self, family):
        return family.name == "hf_bert"

    def add(self, adapted, family, name, variant):
        return adapted.add_adapter(name, self.variants[variant])


#: UniPELT only: its parts (gated prefix, bottleneck and LoRA) cover MAM's (prefix, parallel bottleneck),
#: and a matrix case costs about 16 s of CPU. MAM would be ``UnionMethod("mam", variants=(
#: "mam[prefix_length=3,bottleneck_size=8]", "mam[prefix_length=2,reduction_factor=4]"))``.
UNION_METHODS = (
    UnionMethod("unipelt", variants=("unipelt[prefix_length=3,bottleneck_size=8]",
                                     "unipelt[prefix_length=2,bottleneck_size=4,r=2]")),
)

METHODS = (
    (LinearAdapterMethod(), MHAAdapterMethod(), LoRAMethod(), DoRAMethod(), IA3Method(), VeRAMethod())
    + BOTTLENECK_METHODS
    + (PromptTuningMethod(), PrefixTuningMethod())
    + UNION_METHODS
)
