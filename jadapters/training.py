"""Training only the enabled adapters.

:func:`partition` splits a variables tree into the *trainable* adapter params
and everything else, *frozen*; :func:`combine` joins them back. Neither copies
an array. A hand-written loop needs nothing more: differentiate w.r.t. the
trainable tree only, and the base model gets no gradient and no optimizer
state at all. For code that keeps one params tree, :func:`adapter_optimizer`
wraps an optax optimizer so that frozen leaves get zero updates and no state.

:func:`make_train_step` builds a jitted step on top of these, and :func:`fit`
a progress-bar loop around it. The step follows NeMo's
``unfreeze_enabled_adapters(freeze_batchnorm=True)``: disabled adapters stay
frozen, the base model's BatchNorm layers normalise with their running
statistics (inference mode) even when the model is called with ``train=True``,
and updates the base model makes to its own mutable collections are
discarded, while those of variables inside the trained adapters are kept.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jadapters.context import LOSS_COLLECTION, sum_adapter_losses
from jadapters.errors import AdapterError
from jadapters.transform import AdaptedModule
from jadapters.tree import DATA_KEY, adapter_name_at, merge_trees, replace_leaves, restrict, split_adapters, split_data

Which = Union[Literal["enabled", "all"], Sequence[str]]
Variables = Mapping[str, Any]
Batch = Any
LossFn = Callable[[Any, Batch], "jax.Array | tuple[jax.Array, Mapping[str, jax.Array]]"]

#: Labels of :func:`optimizer_labels`.
ADAPTER_LABEL, FROZEN_LABEL = "adapter", "frozen"


def selected_adapters(adapted: AdaptedModule, which: Which = "enabled") -> list[str]:
    """Names of the adapters that train: the enabled ones, ``'all'`` of them, or those listed.

    The fusion layers of the active setup (``Fuse("a", "b")`` keeps its params
    under the name ``"a,b"``) count as enabled adapters; listing only a fusion
    name trains it alone, the fused adapters frozen (AdapterHub's
    ``train_adapter_fusion``).

    Example:
        >>> import flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters
        >>> model = with_adapters(nn.Dense(4), {"dense": ""})
        >>> model = model.add_adapter("a", LinearAdapter(2)).add_adapter("b", LinearAdapter(2), enabled=False)
        >>> selected_adapters(model), selected_adapters(model, "all")
        (['a'], ['a', 'b'])
    """
    setup = adapted.active_setup
    fusions = list(dict.fromkeys(f.name for f in setup.fusions())) if setup is not None else []
    if which == "enabled":
        return adapted.get_enabled_adapters() + fusions
    if which == "all":
        return adapted.adapter_names() + fusions
    if isinstance(which, str) or not all(isinstance(n, str) for n in which):
        raise AdapterError(f"which must be 'enabled', 'all' or a list of adapter or fusion names, got {which!r}")
    unknown = [n for n in which if n not in adapted.adapter_names() + fusions]
    if unknown:
        raise AdapterError(f"which names {unknown}, which are neither adapters of the model {adapted.adapter_names()} "
                           f"nor fusion layers of its active setup {fusions}")
    return list(dict.fromkeys(which))


def partition(adapted: AdaptedModule, variables: Variables, which: Which = "enabled") -> tuple[dict, dict]:
    """Splits ``variables`` into ``(trainable, frozen)``.

    ``trainable`` is ``{'params': ...}`` holding the params of the selected
    adapters (``'enabled'``: NeMo's ``unfreeze_enabled_adapters``, disabled ones
    stay frozen; ``'all'``: every adapter). ``frozen`` is everything else, all
    collections included. Leaves are shared with ``variables``, not copied.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((2, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, params, jax.random.key(1), x)
        >>> trainable, frozen = partition(model, variables)
        >>> sorted(trainable["params"]["__adapters__"]), sorted(frozen["params"])
        (['a'], ['bias', 'kernel'])
        >>> frozen["params"]["kernel"] is variables["params"]["kernel"]
        True
    """
    names = selected_adapters(adapted, which)
    if not names:
        raise AdapterError(
            f"no {which} adapters to train; the model has {adapted.adapter_names()} "
            f"(enable some with set_enabled_adapters, or add one with add_adapter)"
        )
    trainable, frozen_params = split_adapters({"params": variables.get("params", {})}, names)
    trainable, data = split_data(trainable)  # an adapter bank's per-slot gains are data
    frozen_params = merge_trees(frozen_params, data)
    if not trainable:
        raise AdapterError(
            f"adapters {names} have no params in the variables given: initialise them with "
            f"jadapters.init_adapters first"
        )
    frozen: dict = {}
    for collection, tree in variables.items():
        if collection == "params":
            frozen.update(frozen_params)
        else:
            frozen[collection] = tree
    return trainable, frozen


def combine(trainable: Variables, frozen: Variables) -> dict:
    """Joins what :func:`partition` split: the full variables tree, no copies.

    Example:
        >>> combine({"params": {"a": 1}}, {"params": {"b": 2}, "batch_stats": {"c": 3}})
        {'params': {'a': 1, 'b': 2}, 'batch_stats': {'c': 3}}
    """
    return merge_trees(trainable, frozen)


def optimizer_labels(adapted: AdaptedModule, params: Any, which: Which = "enabled") -> Any:
    """A tree shaped like ``params``: ``'adapter'`` on the selected adapters' leaves, else ``'frozen'``.

    ``params`` is the ``'params'`` collection (or ``{'params': ...}``).

    Example:
        >>> import flax.linen as nn
        >>> from jadapters import LinearAdapter, with_adapters
        >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
        >>> optimizer_labels(model, {"kernel": 0.0, "__adapters__": {"a": {"up": {"kernel": 0.0}}}})
        {'__adapters__': {'a': {'up': {'kernel': 'adapter'}}}, 'kernel': 'frozen'}
    """
    names = set(selected_adapters(adapted, which))

    def label(path, _):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return ADAPTER_LABEL if adapter_name_at(keys) in names and DATA_KEY not in keys else FROZEN_LABEL

    return jax.tree_util.tree_map_with_path(label, params)


def adapter_optimizer(
    tx: optax.GradientTransformation, adapted: AdaptedModule, params: Any, which: Which = "enabled"
) -> optax.GradientTransformation:
    """``tx`` on the selected adapters' leaves of ``params``; frozen leaves get zero updates and no state.

    For code that keeps one params tree. It is ``optax.partition`` with
    ``optax.set_to_zero()`` for frozen leaves, never ``chain(tx, freeze)``,
    which would allocate ``tx``'s state (e.g. Adam moments) for every frozen
    weight. Differentiating only the trainable tree (:func:`partition`) also
    skips the frozen gradients.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x = jnp.ones((2, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
        >>> params = init_adapters(model, params, jax.random.key(1), x)["params"]
        >>> tx = adapter_optimizer(optax.adam(1e-3), model, params)
        >>> opt_state = tx.init(params)
        >>> grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params)
        >>> float(jnp.abs(updates["kernel"]).sum())
        0.0
    """
    labels = optimizer_labels(adapted, params, which)
    if ADAPTER_LABEL not in jax.tree_util.tree_leaves(labels):
        raise AdapterError(
            f"no params of the {which} adapters {selected_adapters(adapted, which)} in the tree given: "
            f"initialise them with jadapters.init_adapters first"
        )
    return optax.partition({ADAPTER_LABEL: tx, FROZEN_LABEL: optax.set_to_zero()}, labels)


@flax.struct.dataclass
class TrainState:
    """What :class:`TrainStep` carries from step to step (a pytree).

    Attributes:
        step: number of steps taken (int32 scalar).
        trainable: ``{'params': ...}`` of the trained adapters.
        frozen: every other variable; the base's arrays are the caller's own, never copied.
        opt_state: the optimizer's state, for ``trainable`` only.
        rng: the key each step folds its step number into for the PRNG streams.
    """

    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: optax.OptState
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """The full variables tree, for ``apply`` (no copies)."""
        return combine(self.trainable, self.frozen)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A train step built by :func:`make_train_step`: ``state, metrics = step(state, batch)``."""

    adapted: AdaptedModule
    tx: optax.GradientTransformation
    which: Which
    update: Callable[[TrainState, Batch], tuple]
    banks: tuple[str, ...] = ()

    def init(self, variables: Variables, rng: jax.Array) -> TrainState:
        """The first state: partitions ``variables`` and initialises the optimizer on the trainable part."""
        trainable, frozen = partition(self.adapted, variables, self.which)
        frozen = {c: tree for c, tree in frozen.items() if c != LOSS_COLLECTION}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=_optimizer(self.tx, self.banks, frozen).init(trainable),
            rng=rng,
        )

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        step, trainable, opt_state, adapter_variables, metrics = self.update(state, batch)
        # The frozen tree is not returned by the jitted update (XLA would copy
        # every base array); only the trained adapters' own variables change.
        frozen = replace_leaves(state.frozen, adapter_variables)
        return state.replace(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state), metrics


def default_inputs(batch: Batch) -> tuple:
    """The model's positional arguments: ``batch['inputs']`` for a dict batch, else ``batch[0]``.

    Example:
        >>> default_inputs(("x", "y")), default_inputs({"inputs": "x", "labels": "y"})
        (('x',), ('x',))
    """
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise AdapterError(
                f"a dict batch needs an 'inputs' entry (the model's input); this one has {sorted(map(str, batch))}: "
                f"rename it, or pass inputs=lambda batch: (batch['x'],) to make_train_step"
            )
        return (batch["inputs"],)
    try:
        return (batch[0],)
    except (TypeError, IndexError, KeyError):
        raise AdapterError(
            f"a batch is a dict with 'inputs' or a sequence whose first item is the model's input; got "
            f"{type(batch).__name__}: pass inputs=... to make_train_step"
        ) from None


def default_adapter_ids(batch: Batch) -> Any:
    """The rows' adapter ids for adapter banks: ``batch['adapter_ids']`` of a dict batch, else None.

    Example:
        >>> default_adapter_ids({"inputs": "x", "adapter_ids": [0, -1]}), default_adapter_ids(("x", "y"))
        ([0, -1], None)
    """
    return batch.get("adapter_ids") if isinstance(batch, Mapping) else None


def _optimizer(tx: optax.GradientTransformation, banks: Sequence[str], frozen: Variables) -> Any:
    """``tx``, or for adapter banks :func:`jadapters.bank.slotwise` (a state per slot) over their leaves."""
    if not banks:
        return tx
    from jadapters.bank import bank_slot_axes, slotwise

    axes = {}
    for bank in banks:
        axes.update(bank_slot_axes(frozen, bank, data_only=True))
    return slotwise(tx, axes)


def make_train_step(
    adapted: AdaptedModule,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    which: Which = "enabled",
    inputs: Callable[[Batch], tuple] = default_inputs,
    adapter_ids: Callable[[Batch], Any] = default_adapter_ids,
    model_kwargs: Mapping[str, Any] | None = None,
    mutable: Sequence[str] | None = None,
    rng_streams: Sequence[str] = ("dropout",),
    freeze_batchnorm: bool = True,
    jit: bool = True,
) -> TrainStep:
    """A step that trains the selected adapters and nothing else.

    Each step applies ``adapted`` with ``training=True`` to ``*inputs(batch)``
    (plus ``model_kwargs``, e.g. ``{'train': True}`` for the base model's own
    BatchNorm/dropout flag), then minimises ``loss_fn(outputs, batch)`` plus
    the adapters' auxiliary losses. ``loss_fn`` returns a scalar, or
    ``(scalar, dict of metrics)``. Gradients are taken w.r.t. the trained
    adapters' params only. Each stream in ``rng_streams`` gets a key derived
    from ``state.rng`` and ``state.step``. ``mutable`` (default: every
    collection in the variables but params) may change during the step: the
    base model's changes are discarded, the trained adapters' kept.
    ``freeze_batchnorm`` (NeMo's default, True) runs the base model's
    BatchNorm layers on their running statistics; False lets them normalise
    with batch statistics when the model is called in training mode (their
    statistics still never change). Metrics: ``loss``, ``task_loss``,
    ``aux_loss`` and yours.

    Adapter banks (mixed-adapter batches): ``adapter_ids(batch)`` (default:
    ``batch['adapter_ids']``) gives each row's slot; one step trains every
    adapter present in the batch, each slot with its own optimizer state
    (:func:`jadapters.bank.slotwise`), so a mixed batch trains several tasks
    at once on one frozen base exactly as separate steps on each task's rows
    would (for a loss that sums over rows).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x, y = jnp.ones((2, 4)), jnp.zeros((2, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, params, jax.random.key(1), x)
        >>> step = make_train_step(model, lambda out, batch: jnp.mean((out - batch[1]) ** 2), optax.adam(1e-2))
        >>> state = step.init(variables, jax.random.key(2))
        >>> state, metrics = step(state, (x, y))
        >>> int(state.step), state.frozen["params"]["kernel"] is params["params"]["kernel"]
        (1, True)
    """
    if not isinstance(adapted, AdaptedModule):
        raise AdapterError(f"make_train_step expects the AdaptedModule returned by with_adapters, got {type(adapted).__name__}")
    if not callable(loss_fn):
        raise AdapterError(f"make_train_step: loss_fn must be a function (outputs, batch) -> loss, got {loss_fn!r}")
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise AdapterError(
            f"make_train_step: tx must be an optax.GradientTransformation such as optax.adam(1e-3), got {tx!r}"
        )
    trainer = adapted.clone(training=True, freeze_batchnorm=freeze_batchnorm)
    names = tuple(selected_adapters(adapted, which))
    banks = _banks(adapted, names)
    call_kwargs = dict(model_kwargs or {})
    streams = tuple(rng_streams)

    def update(state: TrainState, batch: Batch):
        args = inputs(batch)
        if not isinstance(args, tuple):
            raise AdapterError(f"inputs(batch) must return a tuple of positional arguments, got {type(args).__name__}")
        step_key = jax.random.fold_in(state.rng, state.step)
        rngs = {stream: jax.random.fold_in(step_key, i) for i, stream in enumerate(streams)}
        frozen = state.frozen
        collections = [c for c in frozen if c != "params"] if mutable is None else list(mutable)

        ids = adapter_ids(batch) if banks else None
        extra = {} if ids is None else {"adapter_ids": ids}

        def objective(trainable):
            outputs, mutated = trainer.apply(
                combine(trainable, frozen), *args, rngs=rngs, mutable=collections + [LOSS_COLLECTION],
                **call_kwargs, **extra
            )
            task_loss, metrics = _loss_and_metrics(loss_fn(outputs, batch))
            aux_loss = sum_adapter_losses(mutated)
            return task_loss + aux_loss, (mutated, task_loss, aux_loss, dict(metrics))

        (loss, (mutated, task_loss, aux_loss, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.trainable
        )
        # Banks: each slot's optimizer state moves only when the batch holds its rows.
        present = {"present": _slots_present(ids, adapted, banks)} if banks else {}
        updates, opt_state = _optimizer(tx, banks, frozen).update(grads, state.opt_state, state.trainable, **present)
        trainable = optax.apply_updates(state.trainable, updates)
        changed = {c: mutated[c] for c in collections if c in mutated and c != "params"}
        kept = restrict(split_adapters(changed, names)[0], frozen)
        metrics = {"loss": loss, "task_loss": task_loss, "aux_loss": aux_loss, **metrics}
        return state.step + 1, trainable, opt_state, kept, metrics

    which = which if isinstance(which, str) else tuple(which)
    return TrainStep(adapted=trainer, tx=tx, which=which, update=jax.jit(update) if jit else update, banks=banks)


def _slots_present(ids: Any, adapted: AdaptedModule, banks: Sequence[str]) -> Any:
    """Which slots of the banks the batch's rows name (None without ids: every slot moves)."""
    from jadapters.bank import slots_present

    return None if ids is None else slots_present(ids, adapted.get_adapter(banks[0]).adapter.slots)


def _banks(adapted: AdaptedModule, names: Sequence[str]) -> tuple[str, ...]:
    """The trained adapters that are adapter banks; they must agree on their number of slots."""
    from jadapters.bank import AdapterBank

    specs = [s for s in adapted.adapters if s.name in set(names) and isinstance(s.adapter, AdapterBank)]
    banks = tuple(s.name for s in specs)
    slots = {s.adapter.slots for s in specs}
    if len(slots) > 1:
        raise AdapterError(f"make_train_step: the adapter banks {list(banks)} have different numbers of slots "
                           f"{sorted(slots)}; one batch's adapter_ids name slots of every bank, so they must agree")
    return banks


def fit(
    step: Callable[[TrainState, Batch], tuple[TrainState, Mapping[str, Any]]],
    state: TrainState,
    batches: Iterable[Batch],
    num_steps: int | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[TrainState, Mapping[str, Any]], None] | None = None,
) -> tuple[TrainState, list[float]]:
    """Runs ``step`` over ``batches`` (at most ``num_steps``) with a progress bar.

    Returns the final state and the loss of every step. ``on_step(state,
    metrics)`` runs after each step (e.g. to save a checkpoint every N steps).
    A helper, not a framework: a loop of your own needs only
    :func:`partition` and :func:`combine`.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
        >>> from jadapters import LinearAdapter, with_adapters, init_adapters
        >>> x, y = jnp.ones((2, 4)), jnp.zeros((2, 4))
        >>> params = nn.Dense(4).init(jax.random.key(0), x)
        >>> model = with_adapters(nn.Dense(4), {"dense": ""}).add_adapter("a", LinearAdapter(2))
        >>> variables = init_adapters(model, params, jax.random.key(1), x)
        >>> step = make_train_step(model, lambda out, batch: jnp.mean((out - batch[1]) ** 2), optax.adam(1e-2))
        >>> state, losses = fit(step, step.init(variables, jax.random.key(2)), [(x, y)] * 5, progress=False)
        >>> len(losses), losses[-1] < losses[0]
        (5, True)
    """
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0):
        raise AdapterError(f"fit: num_steps must be an int >= 0 or None (every batch), got {num_steps!r}")
    if not callable(step):
        raise AdapterError(f"fit: step must be a TrainStep (from make_train_step) or a function, got {step!r}")
    if num_steps is None and hasattr(batches, "__len__"):
        total = len(batches)
    else:
        total = num_steps
    losses: list[float] = []
    with tqdm(total=total, disable=not progress, desc="training", unit="step") as bar:
        for batch in itertools.islice(batches, num_steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(state, metrics)
    return state, losses


def _loss_and_metrics(result: Any) -> tuple[Any, Mapping[str, Any]]:
    """The loss function's result as ``(scalar loss, metrics)``; a clear error for anything else."""
    expected = "loss_fn must return a scalar loss, or (scalar loss, dict of metrics)"
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], Mapping):
            raise AdapterError(f"{expected}; it returned a tuple of {len(result)} ({', '.join(type(r).__name__ for r in result)})")
        loss, metrics = result
    else:
        loss, metrics = result, {}
    shape = getattr(loss, "shape", None)
    if shape is None or shape != ():
        what = f"an array of shape {shape}" if shape is not None else type(loss).__name__
        raise AdapterError(f"{expected}; its loss is {what} (reduce it, e.g. with .mean())")
    return loss, dict(metrics)
