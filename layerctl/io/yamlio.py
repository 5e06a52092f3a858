"""YAML recipes from other people: safe loading, line numbers, schema errors that say where.

    data, loc = load_yaml("recipe.yaml")          # yaml.SafeLoader, no Python tags
    cfg = validate(data, MyConfig, loc, "recipe.yaml")
    cfg = load_model_yaml("recipe.yaml", MyConfig, overrides=["train.steps=100"])

Every error is a `LayerctlError` (exit 2) whose message lists each problem as
``file:line: key.path: message`` — unknown keys get a "did you mean" hint.
`--set a.b=value` overrides are parsed as YAML values (safe loader too) and
reported as ``--set a.b=value: ...`` when they are the culprit.

pyyaml and pydantic are imported here; import this module lazily from the CLI.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from layerctl.errors import LayerctlError

MAX_BYTES = 16 * 1024 * 1024  # a recipe is text; refuse anything bigger
MAX_NODES = 1_000_000  # expanded node count (alias bombs: "billion laughs")

# Tags yaml.SafeLoader constructs. Anything else (python/..., custom !tags) is refused.
_SAFE_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("null", "bool", "int", "float", "binary", "timestamp", "omap", "pairs", "set", "str", "seq", "map")
}
_MERGE_TAG = "tag:yaml.org,2002:merge"

KeyPath = tuple  # of str keys and int list indexes


def format_path(path: Iterable) -> str:
    """('jobs', 2, 'steps') -> 'jobs[2].steps'."""
    out = ""
    for el in path:
        if isinstance(el, int) and not isinstance(el, bool):
            out += f"[{el}]"
        else:
            out += ("." if out else "") + str(el)
    return out


class Locator:
    """Where each key path of a loaded YAML document came from (file:line, or a --set override)."""

    def __init__(self, source: str):
        self.source = source
        self._where: dict[KeyPath, str] = {}

    def record(self, path: KeyPath, where: str) -> None:
        self._where.setdefault(tuple(path), where)

    def set(self, path: KeyPath, where: str) -> None:
        """Mark a path and everything below it as coming from `where` (an override)."""
        path = tuple(path)
        for k in [k for k in self._where if k[: len(path)] == path]:
            del self._where[k]
        self._where[path] = where

    def line(self, path: Sequence) -> Optional[int]:
        """The 1-based line of the nearest recorded ancestor of `path` (None when unknown / overridden)."""
        w = self.where(path)
        if w.startswith(self.source + ":"):
            try:
                return int(w.rsplit(":", 1)[1])
            except ValueError:
                return None
        return None

    def where(self, path: Sequence) -> str:
        """'file:line' of the nearest recorded ancestor of `path` (the file name alone when none)."""
        path = tuple(path)
        while True:
            if path in self._where:
                return self._where[path]
            if not path:
                return self.source
            path = path[:-1]

    def __contains__(self, path) -> bool:
        return tuple(path) in self._where


def _mark(source: str, mark) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _check_nodes(root, source: str) -> None:
    """Refuse unsafe tags, duplicate keys and alias bombs before anything is constructed."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            kids = _children(node)
            sizes[nid] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[nid] > MAX_NODES:
                raise LayerctlError(
                    f"{_mark(source, node.start_mark)}: document expands to more than {MAX_NODES:,} nodes "
                    "(too many aliases?)"
                )
            continue
        if nid in sizes:
            continue
        if node.tag not in _SAFE_TAGS and node.tag != _MERGE_TAG:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            kind = "Python tags are" if "python/" in node.tag else "custom tags are"
            raise LayerctlError(f"{_mark(source, node.start_mark)}: tag {tag} is not allowed ({kind} refused; recipes are plain data)")
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, _v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                    key = (k.tag, k.value)
                    if key in seen:
                        raise LayerctlError(
                            f"{_mark(source, k.start_mark)}: duplicate key '{k.value}' "
                            f"(first given on line {seen[key] + 1})"
                        )
                    seen[key] = k.start_mark.line
        stack.append((node, True))
        for k in _children(node):
            if id(k) not in sizes:
                stack.append((k, False))


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _record_lines(node, path: KeyPath, loc: Locator, source: str, seen: set) -> None:
    """Record the line of every key path (the key's line for mappings, the item's line for lists)."""
    if id(node) in seen:  # an alias: its inner paths fall back to the alias's own line
        return
    if isinstance(node, yaml.MappingNode):
        seen = seen | {id(node)}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == _MERGE_TAG:
                continue
            key = _scalar_key(k)
            loc.record(path + (key,), _mark(source, k.start_mark))
            _record_lines(v, path + (key,), loc, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        seen = seen | {id(node)}
        for i, v in enumerate(node.value):
            loc.record(path + (i,), _mark(source, v.start_mark))
            _record_lines(v, path + (i,), loc, source, seen)


def _scalar_key(k) -> Any:
    # The key as the constructed dict holds it (YAML 1.1: `on:` is True, `1:` is 1).
    try:
        return yaml.SafeLoader("").construct_object(k, deep=True)  # scalars only: cheap and safe
    except Exception:  # noqa: BLE001
        return k.value


def loads_yaml(text: str, source: str = "<string>"):
    """Parse YAML text safely; returns (data, Locator). Empty text gives (None, locator)."""
    if text.startswith("\ufeff"):  # a byte-order mark (Windows Notepad), e.g. a recipe on stdin
        text = text[1:]
    loc = Locator(source)
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = " ".join(x for x in (exc.context, exc.problem) if x) or "invalid YAML"
            lines = text.splitlines()
            near = [lines[m.line] for m in (exc.context_mark, exc.problem_mark) if m is not None and m.line < len(lines)]
            if any("${" in ln for ln in near):
                what += ' (inside [ ] or { }, quote ${...} references: "${job.fg}")'
            raise LayerctlError(f"{_mark(source, mark)}: YAML syntax error: {what}") from None
        except yaml.YAMLError as exc:
            raise LayerctlError(f"{source}: YAML error: {exc}") from None
        if node is None:
            return None, loc
        loc.record((), f"{source}:{node.start_mark.line + 1}")
        _check_nodes(node, source)
        try:
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = " ".join(x for x in (exc.context, exc.problem) if x) or "cannot read value"
            raise LayerctlError(f"{_mark(source, mark)}: {what}") from None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            raise LayerctlError(f"{source}: cannot read value: {exc}") from None
        _record_lines(node, (), loc, source, set())
        return data, loc
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike):
    """Read a YAML file with a safe loader; returns (data, Locator). Clear one-line errors."""
    p = Path(path)
    source = str(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise LayerctlError(f"file not found: {p}") from None
    except OSError as exc:
        raise LayerctlError(f"cannot read {p}: {exc.strerror}") from None
    if p.is_dir():
        raise LayerctlError(f"{p} is a folder, not a YAML file")
    if size > MAX_BYTES:
        raise LayerctlError(f"{p}: {size:,} bytes is too big for a recipe (limit {MAX_BYTES:,})")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise LayerctlError(f"cannot read {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LayerctlError(f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    return loads_yaml(text, source)


# ---------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list, Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML). List indexes as numbers: 'jobs.0.steps=4'."""
    if "=" not in item:
        raise LayerctlError(f"--set {item}: expected KEY=VALUE (e.g. --set defaults.steps=4)")
    key, _, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise LayerctlError(f"--set {item}: bad key path '{key}' (e.g. defaults.steps)")
    value = loads_yaml(raw, f"--set {item}")[0] if raw.strip() else ""
    return parts, value


def apply_overrides(data, locator: Locator, overrides: Iterable[str]):
    """Apply `--set a.b=value` items to a loaded document (in place when it is a dict); returns it."""
    for item in overrides or ():
        parts, value = parse_override(item)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LayerctlError(f"--set {item}: the document is not a mapping of keys")
        cur = data
        path: list = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(cur, list):
                try:
                    idx = int(part)
                except ValueError:
                    raise LayerctlError(f"--set {item}: {format_path(path)} is a list; use a number, not '{part}'") from None
                if not -len(cur) <= idx < len(cur):
                    raise LayerctlError(f"--set {item}: {format_path(path)} has {len(cur)} items (no index {idx})")
                idx %= len(cur)
                path.append(idx)
                if last:
                    cur[idx] = value
                else:
                    cur = cur[idx]
            elif isinstance(cur, dict):
                path.append(part)
                if last:
                    cur[part] = value
                else:
                    if cur.get(part) is None:
                        cur[part] = {}
                        locator.set(tuple(path), f"--set {item}")
                    cur = cur[part]
            else:
                raise LayerctlError(f"--set {item}: {format_path(path)} is a single value, not a mapping")
        locator.set(tuple(path), f"--set {item}")
    return data


# ---------------------------------------------------------------- validation


def _unwrap(tp) -> list:
    """The concrete types inside Optional / Union / Annotated."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        out = []
        for a in typing.get_args(tp):
            out.extend(_unwrap(a))
        return out
    return [tp]


def _is_model(tp) -> bool:
    from pydantic import BaseModel

    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _literal_values(model) -> set:
    vals = set()
    for f in model.model_fields.values():
        for t in _unwrap(f.annotation):
            if typing.get_origin(t) is typing.Literal:
                vals.update(str(v) for v in typing.get_args(t))
    return vals


def _model_keys(model) -> set:
    keys = set()
    for name, f in model.model_fields.items():
        keys.add(f.alias or name)
    return keys


def _keys_at(root, loc: Sequence) -> set:
    """Field names allowed at the mapping that `loc` points into (best effort, through unions/lists/dicts)."""
    cur = [root]
    for el in loc:
        nxt = []
        for tp in cur:
            for t in _unwrap(tp):
                if _is_model(t):
                    fields = {(f.alias or n): f for n, f in t.model_fields.items()}
                    if isinstance(el, str) and el in fields:
                        nxt.append(fields[el].annotation)
                    if isinstance(el, str) and (el == t.__name__ or el in _literal_values(t)):
                        nxt.append(t)  # a union member's tag in pydantic's error location
                    continue
                origin = typing.get_origin(t)
                args = typing.get_args(t)
                if origin in (list, tuple, set, frozenset, typing.Sequence) and args and isinstance(el, int):
                    nxt.append(args[0])
                elif origin is dict and len(args) == 2:
                    nxt.append(args[1])
        cur = nxt
        if not cur:
            break
    keys: set = set()
    for tp in cur:
        for t in _unwrap(tp):
            if _is_model(t):
                keys |= _model_keys(t)
    return keys


def _all_keys(root, seen=None) -> set:
    seen = set() if seen is None else seen
    keys: set = set()
    stack = [root]
    while stack:
        tp = stack.pop()
        for t in _unwrap(tp):
            if _is_model(t):
                if t in seen:
                    continue
                seen.add(t)
                keys |= _model_keys(t)
                stack.extend(f.annotation for f in t.model_fields.values())
            else:
                stack.extend(typing.get_args(t))
    return keys


def _data_path(data, loc: Sequence) -> tuple:
    """Pydantic's error location with union tags / class names dropped: the path in the document."""
    out = []
    cur = data
    n = len(loc)
    for i, el in enumerate(loc):
        if isinstance(cur, dict) and el in cur:
            out.append(el)
            cur = cur[el]
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            out.append(el)
            cur = cur[el]
        elif i == n - 1 and isinstance(cur, dict):
            out.append(el)  # a missing key
            cur = None
        elif isinstance(el, str) and el.startswith(("function-", "json-or-python", "lax-or-strict")):
            continue
        elif isinstance(cur, (dict, list)):
            continue  # a union member name or tag
        else:
            break
    return tuple(out)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def error_lines(exc, data, root_model, locator: Locator) -> list[str]:
    """One 'where: key.path: message' line per pydantic error, in document order."""
    rows = []
    seen = set()
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        path = _data_path(data, loc)
        etype = err.get("type", "")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if etype == "extra_forbidden":
            key = str(path[-1]) if path else str(loc[-1] if loc else "?")
            allowed = _keys_at(root_model, loc[:-1]) or _all_keys(root_model)
            hint = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
            msg = f"unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            if not hint and allowed and len(allowed) <= 12:
                msg += f" (allowed: {', '.join(sorted(allowed))})"
        elif etype == "missing":
            msg = "required key missing"
        else:
            inp = err.get("input")
            if etype not in ("value_error", "assertion_error") and not isinstance(inp, (dict, list)) and inp is not None:
                msg += f" (got {_short(inp)})"
        where = locator.where(path)
        key = (where, path, msg)
        if key in seen:  # the same complaint from several union members
            continue
        seen.add(key)
        line = locator.line(path) or 0
        rows.append((0 if where.startswith("--set") else 1, line, f"{where}: {format_path(path) or '(top level)'}: {msg}"))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def validate(data, model, locator: Locator, source_name: Optional[str] = None):
    """Validate loaded YAML data against a pydantic model; one LayerctlError listing every problem."""
    from pydantic import ValidationError

    source = source_name or locator.source
    if data is None:
        raise LayerctlError(f"{source}: the file is empty")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = error_lines(exc, data, model, locator)
        n = len(lines)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}:" if n > 1 else ""
        raise LayerctlError("\n".join(([head] if head else []) + lines)) from None


def load_model_yaml(path, model, overrides: Iterable[str] = ()):
    """load_yaml + --set overrides + validate: the one call a recipe-reading command needs."""
    data, loc = load_yaml(path)
    if data is None and not list(overrides or ()):
        raise LayerctlError(f"{path}: the file is empty")
    data = apply_overrides(data, loc, overrides)
    if not isinstance(data, dict):
        raise LayerctlError(f"{loc.where(())}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return validate(data, model, loc, str(path))
