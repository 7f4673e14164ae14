"""Exception helpers: nurseries wrap errors in groups, callers want the cause; and a
failure told in a few words, from wherever in its chain it says something."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc``, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


@contextmanager
def collapse_groups(*same: type[BaseException]) -> Iterator[None]:
    """Re-raise a group holding exactly one exception as that exception.

    With ``same`` given, a group whose exceptions are all of those types is re-raised
    as its first: several tasks often notice one failure at once (a send and a
    receive on a dead connection), and that is still one failure.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        found = leaves(group)
        if len(found) == 1 or (same and all(isinstance(e, same) for e in found)):
            raise found[0] from None
        raise


def describe(exc: BaseException) -> str:
    """What went wrong, from the first exception in the chain that says something
    (trio's BrokenResourceError often says nothing; its cause, e.g. the TLS alert
    "certificate required" from a peer that refused ours, does)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            reason = (seen.reason or str(seen)).replace("_", " ").lower()
            return f"TLS: {reason}"
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__
