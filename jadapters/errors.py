"""The exceptions jadapters raises.

Every error names the adapter and, where one is involved, the module path, and
is raised before anything is built, so the caller's values are never changed.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter operation was given something it cannot accept.

    Example:
        >>> try:
        ...     raise AdapterError("adapter 'a' at 'encoder': duplicate name")
        ... except ValueError as e:
        ...     print(e)
        adapter 'a' at 'encoder': duplicate name
    """


class UnknownAdapterError(AdapterError, KeyError):
    """An adapter name is not known; the message lists the known ones.

    It is both a ``ValueError`` and a ``KeyError`` (NeMo raises ``KeyError``
    for an unknown name), and prints its message without ``KeyError``'s quotes.

    Example:
        >>> str(UnknownAdapterError("no adapter 'x'; known: ['a']"))
        "no adapter 'x'; known: ['a']"
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
