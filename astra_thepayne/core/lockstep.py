"""The lockstep driver: advance many generators together and serve what they ask for in batches.

A fit written as a generator (:func:`astra_thepayne.core.solver.minimise` and the problem's methods) yields a
request ``(kind, array)`` whenever it needs an expensive product and receives the answer. Run one at a time, each
request would be a matrix-vector product; here the requests of many fits are gathered and served together, so
that one matrix-matrix product answers them all.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

__all__ = ["Request", "run_in_lockstep"]

#: What a fit generator yields: the kind of product and its operand.
Request = tuple[str, Any]


def run_in_lockstep(steps: Iterable[Generator[Request, Any, Any]],
                    serve: Callable[[str, list[Any]], Sequence[Any]]) -> list[Any]:
    """Run the generators ``steps`` to the end together; return their return values, in order.

    At each round every generator that is waiting has yielded one request. ``serve(kind, arrays)`` answers all
    requests of one kind at once and returns one product per array, in order; each generator then receives its
    product and runs to its next request or its end.
    """
    steps = list(steps)
    results: list[Any] = [None] * len(steps)
    pending: dict[int, Request] = {}

    def advance(index: int, value: Any) -> None:
        try:
            pending[index] = steps[index].send(value)
        except StopIteration as stop:
            results[index] = stop.value

    for index in range(len(steps)):
        advance(index, None)
    while pending:
        by_kind: dict[str, list[tuple[int, Any]]] = {}
        for index, (kind, array) in pending.items():
            by_kind.setdefault(kind, []).append((index, array))
        # serve only the most asked-for product: the others wait a round and fall into step with the rest, which
        # keeps the batches large
        kind = max(by_kind, key=lambda k: len(by_kind[k]))
        items = by_kind[kind]
        for index, _ in items:
            del pending[index]
        for (index, _), product in zip(items, serve(kind, [a for _, a in items]), strict=True):
            advance(index, product)
    return results
