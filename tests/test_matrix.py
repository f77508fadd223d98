"""The architecture matrix: every adapter method on every model family, the same checks for each.

For each (family, method) pair the model gets two adapters of the method,
``a`` (enabled) and ``b`` (disabled), and the checks are:

* identity at init (to float rounding of XLA's fusions), for methods that start
  as the identity (not prompt or prefix tuning), and the base's output, bitwise,
  with every adapter disabled;
* each enabled adapter runs exactly once per call of each module it targets
  (counted at run time, so inside ``nn.scan`` too), a disabled one never;
* training steps change exactly the enabled adapter's leaves: base params,
  batch statistics and the disabled adapter stay bitwise equal;
* save -> load onto fresh base params gives identical outputs;
* switching the enabled mask never serves a stale compiled trace;
* a bfloat16 base works: float32 adapters on it, identity at init, the base's
  output dtype, a finite and visible effect once moved off init.

Adapter weights are moved off their (zero) init wherever a zero adapter
would make a check pass vacuously.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadapters
from jadapters import Strategy

from architectures.methods import METHODS
from architectures.zoo import base_variables, bf16, families, primary_output

CASES = [(family, method) for family in families() for method in METHODS if method.applies(family)]

_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Counting(Strategy):
    """Counts at run time how often ``inner`` joins each call, then defers to it."""

    inner: Strategy = None

    @property
    def changes_shape(self):
        return self.inner.changes_shape

    def around(self, adapter, call, ctx):
        key = (ctx.name, ctx.path)
        jax.debug.callback(lambda: _COUNTS.update([key]))
        return self.inner.around(adapter, call, ctx)


def parts(adapted, name):
    """The adapters ``name`` stands for: itself, or a union's parts (``mam``, ``unipelt``)."""
    return [s.name for s in adapted.adapters if name in (s.name, s.group)]


def counting(adapted):
    specs = tuple(dataclasses.replace(s, strategy=Counting(s.strategy)) for s in adapted.adapters)
    return adapted.clone(adapters=specs)


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward(module, variables, inputs, kwargs):
    """The one jitted forward of the matrix: the module (and its enabled mask) is a static argument."""
    return module.apply(variables, *inputs, **dict(kwargs))


def run(module, variables, inputs, kwargs):
    return forward(module, variables, inputs, tuple(sorted(kwargs.items())))


@functools.cache
def base_forward(family_name):
    """The base model's jitted forward (a closure: third-party modules need not be hashable)."""
    family = next(f for f in families() if f.name == family_name)
    model = family.built()[0]
    return jax.jit(lambda variables, inputs: model.apply(variables, *inputs, **family.eval_kwargs))


def call_counts(module, variables, inputs, kwargs):
    """How often each module path runs in one jitted forward pass, counted at run time."""
    counts: collections.Counter = collections.Counter()
    active: set = set()

    def intercept(next_fun, args, kw, context):
        if context.method_name != "__call__" or context.module.scope is None:
            return next_fun(*args, **kw)
        path = "/".join(context.module.scope.path)
        if path in active:  # super().__call__ inside the module's own call: one call of the module
            return next_fun(*args, **kw)
        jax.debug.callback(lambda: counts.update([path]))
        active.add(path)
        try:
            return next_fun(*args, **kw)
        finally:
            active.discard(path)

    def counted(variables, inputs):
        with nn.intercept_methods(intercept):
            return module.apply(variables, *inputs, **kwargs)

    jax.block_until_ready(jax.jit(counted)(variables, inputs))
    return counts


def perturbed(variables, seed=11, scale=0.2):
    """Every adapter leaf moved off its init (zero-initialised ones too), with numpy's generator."""
    adapters, rest = jadapters.split_adapters(variables)
    rng = np.random.default_rng(seed)
    moved = jax.tree_util.tree_map(
        lambda leaf: leaf + jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype), adapters
    )
    return jadapters.merge_trees(rest, moved)


def leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_trees_bitwise_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert np.array_equal(la[key], lb[key]), key


def task_loss(outputs, batch):
    return jnp.mean(jnp.square(primary_output(outputs).astype(jnp.float32) - 0.5))


@dataclasses.dataclass
class Case:
    """One (family, method) pair: the base, the model with adapters 'a' (enabled) and 'b' (disabled).

    ``adapted`` wraps every strategy in :class:`Counting` (a run-time counter that changes no
    value) so that one compiled forward serves all checks; ``plain`` is the same model without.
    """

    family: object
    method: object
    model: nn.Module
    base: dict
    plain: jadapters.AdaptedModule
    adapted: jadapters.AdaptedModule
    initial: dict
    variables: dict
    inputs: tuple

    def out(self, module, variables, inputs=None):
        return run(module, variables, self.inputs if inputs is None else inputs, self.family.eval_kwargs)


@pytest.fixture(
    scope="module",
    params=[pytest.param(c, id=f"{c[0].name}-{c[1].name}", marks=pytest.mark.xdist_group(f"{c[0].name}-{c[1].name}"))
            for c in CASES],
)
def case(request):
    family, method = request.param
    model, base = family.built()
    plain = jadapters.with_adapters(model, family.preset)
    plain = method.add(plain, family, "a", 0)
    plain = method.add(plain, family, "b", 1)
    plain = plain.set_enabled_adapters("b", enabled=False)
    inputs = family.inputs(1)
    initial = jadapters.init_adapters(plain, base, jax.random.key(3), *inputs, **family.eval_kwargs)
    return Case(family, method, model, base, plain, counting(plain), initial, perturbed(initial), inputs)


#: Where mask switching runs for every method: it is the core's (the module's hash as a jit key),
#: and these hold the two ways a model hashes (its own fields; Hugging Face's unhashable config).
MASK_SWITCH_FAMILIES = ("gpt", "hf_bert")


def skip_unless_spot_checked(case, what, chosen=None):
    """Skips a spot check outside the method's spot families (where any of them applies)."""
    chosen = chosen or case.method.spot_families
    if chosen is not None and case.family.name not in chosen and any(
        f.name in chosen and case.method.applies(f) for f in families()
    ):
        pytest.skip(f"{case.method.name}'s {what} case runs on {chosen}")


def assert_trees_close(a, b, tolerance):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        np.testing.assert_allclose(la[key].astype(np.float32), lb[key].astype(np.float32), rtol=tolerance,
                                   atol=tolerance, err_msg=key)


def test_identity_at_init_and_the_base_output_with_adapters_disabled(case):
    """At init the adapters add exact zeros (XLA may still fuse the surrounding ops differently: ulps);
    disabled, the model compiles to the base's own program: bitwise equal."""
    base_out = base_forward(case.family.name)(case.base, case.inputs)
    if case.method.identity_at_init:
        assert_trees_close(case.out(case.adapted, case.initial), base_out, case.method.init_tolerance)

    enabled = primary_output(case.out(case.adapted, case.variables))
    enabled = case.method.to_base(enabled, primary_output(base_out), case.family)
    assert float(jnp.max(jnp.abs(enabled - primary_output(base_out)))) > 1e-4, "the adapter changed nothing"
    disabled = case.adapted.set_enabled_adapters(enabled=False)
    assert_trees_bitwise_equal(case.out(disabled, case.variables), base_out)


def test_each_enabled_adapter_runs_exactly_once_per_call_of_its_modules(case):
    expected = _base_counts(case.family.name)
    _COUNTS.clear()
    jax.block_until_ready(case.out(case.adapted, case.variables))
    located = jadapters.tree.adapter_locations(case.variables)
    for a in parts(case.plain, "a"):
        assert located[a], f"adapter {a!r} was placed nowhere"
        places = set(located[a]) | set(case.method.runs_without_params(case.family))
        for path in places:
            assert _COUNTS[(a, path)] == expected[path] > 0, (a, path, _COUNTS[(a, path)], expected[path])
        assert {p for (name, p) in _COUNTS if name == a} == places
    assert not any(name in parts(case.plain, "b") for name, _ in _COUNTS), "a disabled adapter ran"


@functools.cache
def _base_counts(family_name):
    family = next(f for f in families() if f.name == family_name)
    model, base = family.built()
    return call_counts(model, base, family.inputs(1), family.eval_kwargs)


def test_training_changes_exactly_the_enabled_adapter(case):
    step = jadapters.make_train_step(
        case.plain, task_loss, optax.adam(1e-2), inputs=lambda batch: batch, model_kwargs=case.family.train_kwargs
    )
    state = step.init(case.variables, jax.random.key(5))
    for seed in (2, 3):
        state, metrics = step(state, case.family.inputs(seed))
    assert np.isfinite(float(metrics["loss"]))
    before, after = leaves(case.variables), leaves(state.variables)
    assert before.keys() == after.keys()
    changed = {k for k in before if not same_bits(before[k], after[k])}
    trained = {k for k in before if k.startswith("['params']")
               and any(f"['__adapters__']['{a}']" in k for a in parts(case.plain, "a"))}
    free = {k for k in trained if any(k.endswith(s) for s in case.method.gradient_free)}
    changed, trained = changed - free, trained - free
    assert trained and changed == trained, (sorted(trained - changed)[:5], sorted(changed - trained)[:5])


@functools.cache
def fresh_base(family_name):
    """Base variables built apart from those the adapters were initialised on, once per family
    (building compiles the model's init: seconds); never modify them."""
    family = next(f for f in families() if f.name == family_name)
    return family.make()[1]


def test_save_then_load_onto_fresh_base_params_gives_identical_outputs(case, tmp_path):
    path = jadapters.save_adapters(tmp_path / "adapters", case.plain, case.variables)
    fresh = fresh_base(case.family.name)
    restored, variables = jadapters.load_adapters(path, case.model, fresh)
    a, b = parts(case.plain, "a"), parts(case.plain, "b")
    assert restored.get_enabled_adapters() == a and restored.adapter_names() == a + b
    assert_trees_bitwise_equal(jadapters.split_adapters(variables)[0], jadapters.split_adapters(case.variables)[0])
    assert_trees_bitwise_equal(case.out(counting(restored), variables), case.out(case.adapted, case.variables))


def test_switching_the_mask_never_serves_a_stale_trace(case):
    """One jitted function, the module a static argument, switched back and forth between masks:
    each call must give its own mask's output. References: the base model, and a function jitted
    for the one mask alone."""
    skip_unless_spot_checked(case, "mask-switching", case.method.spot_families or MASK_SWITCH_FAMILIES)
    kwargs = case.family.eval_kwargs
    only_a, none = case.adapted, case.adapted.set_enabled_adapters(enabled=False)
    reference = {
        "none": primary_output(base_forward(case.family.name)(case.base, case.inputs)),
        "a": jax.jit(lambda v, i: primary_output(only_a.apply(v, *i, **kwargs)))(case.variables, case.inputs),
    }
    assert not np.allclose(case.method.to_base(reference["a"], reference["none"], case.family), reference["none"])
    for name, module in [("a", only_a), ("none", none), ("a", only_a), ("none", none)]:
        got = primary_output(run(module, case.variables, case.inputs, kwargs))
        np.testing.assert_allclose(got, reference[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_bfloat16_base(case):
    family = case.family
    skip_unless_spot_checked(case, "bfloat16")
    base = bf16(case.base)
    inputs = tuple(x.astype(jnp.bfloat16) if i in family.float_inputs else x for i, x in enumerate(case.inputs))
    initial = jadapters.init_adapters(case.plain, base, jax.random.key(3), *inputs, **family.eval_kwargs)
    adapter_leaves = jax.tree_util.tree_leaves(jadapters.split_adapters(initial)[0])
    assert {leaf.dtype for leaf in adapter_leaves} == {jnp.dtype(jnp.float32)}
    base_out = base_forward(family.name)(base, inputs)
    if case.method.identity_at_init:
        assert_trees_close(case.out(case.adapted, initial, inputs), base_out, 1e-2)

    variables = perturbed(initial)
    out = primary_output(case.out(case.adapted, variables, inputs))
    assert out.dtype == primary_output(base_out).dtype and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    out = case.method.to_base(out, primary_output(base_out), family)
    change = float(jnp.max(jnp.abs(out.astype(jnp.float32) - primary_output(base_out).astype(jnp.float32))))
    assert change > case.method.bf16_change


def _operations(module, variables, inputs, kwargs):
    """Every operation of the forward pass, nested programs (scan, remat) included: (primitive, output types).

    Inputs are left out: a scan passes its layers' unused (disabled) adapter params to its body, which
    computes nothing with them."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name, tuple(str(v.aval) for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    return list(walk(jax.make_jaxpr(lambda v, i: module.apply(v, *i, **kwargs))(variables, inputs).jaxpr))


def test_merging_gives_the_adapted_output_at_the_base_cost(case):
    """merge_adapters folds 'a' into the weights: the adapted output within 1e-5 (float32), and the
    merged model (with 'b' still there, disabled) runs exactly the base model's operations."""
    if not case.method.mergeable:
        pytest.skip(f"{case.method.name} does not merge")
    kwargs = case.family.eval_kwargs
    model, merged = jadapters.merge_adapters(case.plain, case.variables, *case.inputs, **kwargs)
    b = parts(case.plain, "b")
    assert model.adapter_names() == b and jadapters.tree.adapter_locations(merged).keys() == set(b)
    expected = case.out(case.adapted, case.variables)
    assert_trees_close(model.apply(merged, *case.inputs, **kwargs), expected, 1e-5)
    base_model = case.family.built()[0]
    assert _operations(model, merged, case.inputs, kwargs) == _operations(base_model, case.base, case.inputs, kwargs)
