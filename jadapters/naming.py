"""Adapter names (``name``, ``module:name``, ``a+b:name``) and module-path patterns.

Module paths are the '/'-joined names of a Flax module's scope, as they appear
in the params tree, e.g. ``'encoder/layers_0/fc'``. A target is one of

* a plain path or name, without wildcards: it matches the module at that
  path and every module whose path ends with ``'/'`` + it, PEFT's rule for
  ``target_modules``: ``'query'`` matches ``'encoder/layer/0/attention/self/query'``,
  ``'self/query'`` too; ``''`` is the root module alone;
* a glob: ``*`` matches within one path segment, ``**`` across segments,
  ``?`` one character, ``[..]`` a character class, matched against the whole
  path: ``'encoder/layers_*'``;
* a regular expression, given as ``re.compile(...)`` or as the string
  ``'re:<pattern>'``, matched against the whole path.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping, Sequence, Union

from jadapters.errors import AdapterError, UnknownAdapterError

Target = Union[str, "re.Pattern[str]"]

MODULE_SEPARATOR = ":"
MODULE_JOINER = "+"
REGEX_PREFIX = "re:"


def split_adapter_name(name: str) -> tuple[tuple[str, ...], str]:
    """Splits ``'module:name'`` into ``(module names, bare name)``.

    A bare name (or ``':name'``) has no module names: it is a global adapter.

    Example:
        >>> split_adapter_name("encoder+decoder:adapter_0")
        (('encoder', 'decoder'), 'adapter_0')
        >>> split_adapter_name("adapter_0")
        ((), 'adapter_0')
    """
    if not isinstance(name, str):
        raise AdapterError(f"adapter name must be a string, got {name!r}")
    module_part, sep, bare = name.rpartition(MODULE_SEPARATOR)
    if not sep:
        module_part, bare = "", name
    if not bare or bare != bare.strip() or "/" in bare or MODULE_SEPARATOR in bare:
        raise AdapterError(
            f"invalid adapter name {name!r}: expected 'name', 'module:name' or "
            f"'a+b:name' with a non-empty name free of '/', ':' and surrounding spaces"
        )
    modules = tuple(m for m in module_part.split(MODULE_JOINER) if m) if module_part else ()
    return modules, bare


def normalize_target(target: Target) -> str:
    """Returns the canonical string form of a target (regexes as ``'re:...'``).

    Example:
        >>> normalize_target(re.compile(r"enc.*"))
        're:enc.*'
        >>> normalize_target("encoder/layers_0/")
        'encoder/layers_0'
    """
    if isinstance(target, re.Pattern):
        return REGEX_PREFIX + target.pattern
    if not isinstance(target, str):
        raise AdapterError(f"a target must be a path, glob or regex, got {target!r}")
    if target.startswith(REGEX_PREFIX):
        _compile(target)  # fail early on a bad regex
        return target
    return target.strip("/")


def normalize_targets(targets: Target | Iterable[Target]) -> tuple[str, ...]:
    """Canonical, de-duplicated tuple of targets, order kept.

    Example:
        >>> normalize_targets(["a/b", "a/*", "a/b"])
        ('a/b', 'a/*')
    """
    if isinstance(targets, (str, re.Pattern)):
        targets = [targets]
    return tuple(dict.fromkeys(normalize_target(t) for t in targets))


def _glob_to_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def _compile(target: str) -> "re.Pattern[str]":
    if target.startswith(REGEX_PREFIX):
        try:
            return re.compile(target[len(REGEX_PREFIX) :])
        except re.error as e:
            raise AdapterError(f"invalid regular expression target {target!r}: {e}") from None
    return re.compile(_glob_to_regex(target))


GLOB_CHARACTERS = frozenset("*?[")


def is_plain(target: str) -> bool:
    """Whether a canonical target is a plain path or name (matched as a path suffix).

    Example:
        >>> is_plain("attention/query"), is_plain("layers_*/fc"), is_plain("re:.*fc")
        (True, False, False)
    """
    return not target.startswith(REGEX_PREFIX) and not GLOB_CHARACTERS.intersection(target)


def path_matches(path: str, target: str) -> bool:
    """Whether a '/'-joined module path matches a canonical target.

    Example:
        >>> path_matches("encoder/layers_3", "encoder/layers_*")
        True
        >>> path_matches("encoder/layers_3/fc", "encoder/layers_*")
        False
        >>> path_matches("encoder/layers_3/fc", "re:.*/fc")
        True
        >>> path_matches("encoder/layers_3/fc", "fc"), path_matches("encoder/layers_3/fc2", "fc")
        (True, False)
    """
    if is_plain(target):
        return path == target or (bool(target) and path.endswith("/" + target))
    return _compile(target).fullmatch(path) is not None


def qualified_name(modules: Sequence[str], bare: str) -> str:
    """``'a+b:name'`` for an adapter added to modules ``a`` and ``b``; the bare name for a global one.

    Example:
        >>> qualified_name(("encoder", "decoder"), "x"), qualified_name((), "x")
        ('encoder+decoder:x', 'x')
    """
    return f"{MODULE_JOINER.join(modules)}{MODULE_SEPARATOR}{bare}" if modules else bare


def expand_groups(
    requested: str | Sequence[str] | None, groups: Mapping[str, Sequence[str]], names: Sequence[str]
) -> str | list[str] | None:
    """``requested`` with each bare group name (a union of methods) replaced by its members' names.

    A name that is also an adapter's own name stays as it is.

    Example:
        >>> expand_groups("u", {"u": ["u.lora", "u.adapter"]}, ["u.lora", "u.adapter", "b"])
        ['u.lora', 'u.adapter']
        >>> expand_groups(["b", "u"], {"u": ["u.lora"]}, ["u.lora", "b"])
        ['b', 'u.lora']
    """
    if requested is None or not groups:
        return requested
    wanted = [requested] if isinstance(requested, str) else list(requested)
    out: list[str] = []
    for name in wanted:
        members = groups.get(name) if isinstance(name, str) and name not in names else None
        out.extend(members if members else [name])
    return out


def select_names(
    requested: str | Sequence[str] | None,
    available: Sequence[tuple[Sequence[str], str]],
    where: str,
    listed: Sequence[str] | None = None,
) -> list[str]:
    """The bare names that ``requested`` selects among ``available`` ``(modules, bare name)`` pairs.

    ``None`` selects all; a name is bare or ``'module:name'``, whose module
    part must name modules the adapter is on. The result keeps ``available``'s
    order. An empty selection or an unknown name is an error that lists what
    ``where`` has (``listed``, by default the qualified names).

    Example:
        >>> available = [((), "a"), (("decoder",), "b")]
        >>> select_names("decoder:b", available, "the model")
        ['b']
        >>> select_names(["b", "a"], available, "the model")
        ['a', 'b']
        >>> select_names("encoder:b", available, "the model")
        Traceback (most recent call last):
        ...
        jadapters.errors.UnknownAdapterError: no adapter named 'encoder:b'; the model has ['a', 'decoder:b']
    """
    known = [bare for _, bare in available]
    listed = list(listed) if listed is not None else [qualified_name(modules, bare) for modules, bare in available]
    if requested is None:
        return known
    wanted = [requested] if isinstance(requested, str) else list(requested)
    if not wanted:
        raise AdapterError(f"no adapter selected (name={requested!r}); {where} has {listed}")
    modules_of = {bare: tuple(modules) for modules, bare in available}
    chosen = set()
    for name in wanted:
        modules, bare = split_adapter_name(name)
        if bare not in modules_of or not set(modules) <= set(modules_of[bare]):
            raise UnknownAdapterError(f"no adapter named {name!r}; {where} has {listed}")
        chosen.add(bare)
    return [bare for bare in known if bare in chosen]
