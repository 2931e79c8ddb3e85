"""Loops of a kernel's instruction list, as a compiler sees them: basic blocks, dominators,
and the natural loop of every back edge (an edge to a block that dominates its source).
A branch back to an earlier address is not enough: SASS puts divergent slow paths (a
shuffle's ``BRA.DIV`` fallback) after the kernel's end and branches back from them."""

from __future__ import annotations

from collections.abc import Callable


def natural_loops(n: int, successors: Callable[[int], list[int]]) -> list[frozenset[int]]:
    """The instruction indices of every natural loop of instructions ``0..n-1`` (entry 0);
    ``successors(i)``: where control goes after instruction ``i``."""
    if n == 0:
        return []
    succ = [successors(i) for i in range(n)]
    leaders = {0}
    for i, s in enumerate(succ):
        if s != [i + 1]:
            leaders.update(t for t in s if 0 <= t < n)
            if i + 1 < n:
                leaders.add(i + 1)
    starts = sorted(leaders)
    block_of = {}
    blocks = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else n
        blocks.append(range(start, end))
        for i in range(start, end):
            block_of[i] = k
    bsucc = [sorted({block_of[t] for t in succ[b[-1]] if 0 <= t < n}) for b in blocks]
    preds: list[list[int]] = [[] for _ in blocks]
    for b, ss in enumerate(bsucc):
        for s in ss:
            preds[s].append(b)
    # reachable blocks, in reverse post-order, and their dominators (iterative)
    order, seen, stack = [], set(), [(0, iter(bsucc[0]))]
    seen.add(0)
    while stack:
        b, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(b)
            stack.pop()
        elif nxt not in seen:
            seen.add(nxt)
            stack.append((nxt, iter(bsucc[nxt])))
    order.reverse()
    every = set(seen)
    dom = {b: set(every) for b in every}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            ps = [p for p in preds[b] if p in every]
            new = set.intersection(*(dom[p] for p in ps)) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    loops = []
    for u in every:
        for v in bsucc[u]:
            if v in dom[u]:  # back edge u -> v: the natural loop of header v
                body, work = {v, u}, ([u] if u != v else [])
                while work:
                    x = work.pop()
                    for p in preds[x]:
                        if p in every and p not in body:
                            body.add(p)
                            work.append(p)
                loops.append(frozenset(i for b in body for i in blocks[b]))
    return sorted(set(loops), key=min)


def innermost(loops: list[frozenset[int]]) -> list[frozenset[int]]:
    return [a for a in loops if not any(b < a for b in loops)]
