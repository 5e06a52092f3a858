"""The job graph of a plan: ${job.role} references, run order, groups and the split between processes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from layerctl.errors import LayerctlError

# ${job.role}, ${job[2].role}, ${job[i].role}  ($${ is a literal "${")
REF_RE = re.compile(r"(?<!\$)\$\{([^}]*)\}")
REF_BODY_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)(?:\[\s*(\d+|i)\s*\])?\.([A-Za-z_]+)\s*$")
ROLE_ALIASES = {"image": "rgba", "png": "rgba"}


def strings_in(obj, path):
    """(path, string) for every string in a nested dict / list."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings_in(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for n, v in enumerate(obj):
            yield from strings_in(v, path + (n,))


def find_refs(value: str) -> list[str]:
    return [m.group(1) for m in REF_RE.finditer(value)]


def has_ref(value) -> bool:
    return any(True for _p, s in strings_in(value, ()) if REF_RE.search(s))


def close_match(word: str, options) -> Optional[str]:
    import difflib

    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return m[0] if m else None


def find_cycle(deps: list[set], left: list[int]) -> list[int]:
    left_set = set(left)
    start = left[0]
    path = [start]
    seen = {start: 0}
    cur = start
    while True:
        nxt = min(d for d in deps[cur] if d in left_set)
        if nxt in seen:
            return path[seen[nxt]:]
        seen[nxt] = len(path)
        path.append(nxt)
        cur = nxt


def norm_path(p: Path) -> str:
    return os.path.normcase(os.path.abspath(p))


def group_jobs(jobs: list) -> None:
    """Connected components of the reference graph (union-find); group id = smallest index in it."""
    parent = list(range(len(jobs)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for job in jobs:
        for d in job.deps:
            a, b = find(job.index), find(d)
            if a != b:
                parent[max(a, b)] = min(a, b)
    for job in jobs:
        job.group = find(job.index)


def run_order(deps: list[set], names: list[str], where) -> list[int]:
    """Items in run order (file order where references allow); a cycle raises LayerctlError.

    `where(k)` is the recipe position of item k for the message.
    """
    n = len(deps)
    done: list[int] = []
    placed = [False] * n
    while len(done) < n:
        ready = next((k for k in range(n) if not placed[k] and all(placed[d] for d in deps[k])), None)
        if ready is None:
            left = [k for k in range(n) if not placed[k]]
            cycle = find_cycle(deps, left)
            chain = " -> ".join(names[c] for c in cycle + [cycle[0]])
            raise LayerctlError(f"{where(cycle[0])}: jobs[{cycle[0]}]: cyclic references: {chain}")
        placed[ready] = True
        done.append(ready)
    return done


def shard(jobs: list, rank: int, world: int) -> list:
    """This process's jobs: whole groups (jobs joined by references), balanced by count, in index order.

    Deterministic: every process computes the same assignment. Groups are
    placed largest first on the least loaded process (ties: the lower rank).
    """
    if world <= 1:
        return list(jobs)
    groups: dict[int, list] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    load = [0] * world
    owner: dict[int, int] = {}
    for gid in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        r = min(range(world), key=lambda x: (load[x], x))
        owner[gid] = r
        load[r] += len(groups[gid])
    return [job for job in jobs if owner[job.group] == rank]


def owners(jobs: list, world: int) -> dict[int, int]:
    """job index -> process rank (for listings)."""
    out = {}
    for r in range(world):
        for job in shard(jobs, r, world):
            out[job.index] = r
    return out
