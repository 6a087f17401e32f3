"""Carving a seeded held-out part out of a dataset that ships without a validation split."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from embedlab.data.errors import DataError

__all__ = ["carve_split"]

_T = TypeVar("_T")


def carve_split(
    items: Sequence[_T], fraction: float, seed: int, *, key: Callable[[_T], Hashable] | None = None
) -> tuple[list[_T], list[_T]]:
    """Carve about ``fraction`` of ``items`` out as a held-out part: returns ``(carved, rest)``, reproducibly.

    Meant for datasets without a validation split::

        validation, train = carve_split(pairs, 0.1, seed=42)

    The same items, fraction and seed always give the same split (a private ``random.Random(seed)``,
    so global random state neither affects it nor is touched). Both parts keep the input order.
    ``carved`` gets ``round(fraction * n)`` items, clamped so each part has at least one when ``n >= 2``;
    with fewer items everything stays in ``rest``.

    With ``key``, items sharing a key go to the same part and ``fraction`` counts keys, not items --
    ``key=lambda e: e.query_id`` keeps a query with several positives from leaking from training into
    validation.

    Raises:
        DataError: ``fraction`` not strictly between 0 and 1 (it comes from config, e.g. ``data.val_fraction``).
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"fraction must be strictly between 0 and 1, got {fraction!r}")
    group_of = [index if key is None else key(item) for index, item in enumerate(items)]
    groups = list(dict.fromkeys(group_of))
    if len(groups) < 2:
        return [], list(items)
    carved_count = min(max(round(len(groups) * fraction), 1), len(groups) - 1)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    carved_groups = {groups[position] for position in order[:carved_count]}
    carved = [item for item, group in zip(items, group_of) if group in carved_groups]
    rest = [item for item, group in zip(items, group_of) if group not in carved_groups]
    return carved, rest
