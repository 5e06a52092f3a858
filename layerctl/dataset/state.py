"""The output folder of a dataset run: its state file, per-process part files, merge, shards and summary."""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from layerctl import __version__
from layerctl.errors import LayerctlError

from layerctl.dataset.layout import LAYER_DIRS, METADATA, STATE_DIR, STATE_FILE


# ---------------------------------------------------------------- output folder, state, sharding


@dataclass
class Shard:
    """Which share of the records this process does; `barrier` waits for every process."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: Optional[str] = None  # the process's device under accelerate (multi-process only)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_accelerate(cls) -> "Shard":
        """process_index / num_processes of `accelerate launch` (one process without it)."""
        import torch
        from accelerate import PartialState

        # Without CUDA, processes started by torchrun / accelerate share the work over gloo only
        # when PartialState is told it runs on the CPU (else it reports a single process).
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        st = PartialState(cpu=cpu)
        dev = str(st.device) if st.num_processes > 1 else None
        return cls(st.process_index, st.num_processes, st.wait_for_everyone, dev)


def _state(out: Path) -> Path:
    return out / STATE_DIR


def _read_state(out: Path) -> Optional[dict]:
    f = _state(out) / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_out_dir(out: Path, kind: str, settings: dict, resume: bool, overwrite: bool) -> str:
    """'new', 'resume' or 'overwrite'; a clear error for a folder that is not ours to fill."""
    if out.exists() and not out.is_dir():
        raise LayerctlError(f"output {out} exists and is not a folder")
    entries = [e for e in out.iterdir()] if out.is_dir() else []
    if not entries:
        return "new"
    state = _read_state(out)
    if overwrite:
        if state is None:
            raise LayerctlError(
                f"output folder {out} is not empty and was not written by 'layerctl dataset' "
                f"(no {STATE_DIR}/{STATE_FILE}); --overwrite only replaces a dataset folder. Choose an empty --out"
            )
        return "overwrite"
    if not resume:
        raise LayerctlError(f"output folder {out} is not empty (use --resume to continue that run, or --overwrite to start over)")
    if state is None:
        raise LayerctlError(f"cannot resume into {out}: it was not written by 'layerctl dataset' (no {STATE_DIR}/{STATE_FILE})")
    if state.get("kind") != kind:
        raise LayerctlError(f"cannot resume into {out}: it holds a '{state.get('kind')}' dataset, not '{kind}'")
    old = state.get("settings", {})
    diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if diff:
        k = diff[0]
        raise LayerctlError(
            f"cannot resume into {out}: {k} was {old.get(k)!r} there, now {settings.get(k)!r} "
            f"(use the same settings, --overwrite, or a new --out)"
        )
    return "resume"


def read_parts(out: Path) -> list[dict]:
    """Every finished-record line of every process and run, in time order (broken lines ignored)."""
    rows = []
    st = _state(out)
    if not st.is_dir():
        return rows
    for f in sorted(st.glob("part-*.jsonl")):
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict) and "key" in row and "status" in row:
                rows.append(row)
    rows.sort(key=lambda r: (r.get("time", 0.0), 1 if r.get("merge") else 0))
    return rows


def latest_by_key(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        out[r["key"]] = r
    return out


def _append_line(path: Path, row: dict) -> None:
    data = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from layerctl.io.files import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write, overwrite=True, suffix=".jsonl")


def _record_files(record: dict) -> list[str]:
    if "file_name" in record:
        return [record["file_name"]]
    return [record[k] for k in LAYER_DIRS if isinstance(record.get(k), str)]


def _clean_previous(out: Path) -> int:
    """--overwrite: remove the files the previous run listed (ours only), its metadata and state."""
    removed = 0
    rows = read_parts(out)
    meta = out / METADATA
    listed = [r.get("record") for r in rows if isinstance(r.get("record"), dict)]
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                listed.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    root = out.resolve()
    for rec in listed:
        for rel in _record_files(rec) if isinstance(rec, dict) else []:
            p = (out / rel).resolve()
            if root in p.parents and p.is_file():
                p.unlink()
                removed += 1
    if meta.is_file():
        meta.unlink()
    for f in _state(out).glob("*"):
        if f.is_file():
            f.unlink()
    return removed


def _earlier_runs(out: Path, run_id: str) -> dict[str, dict]:
    """The rows finished by earlier runs. Rows of this run are left out: with several processes another
    one may already have written some, and seeing them would make this process's choices (which of two
    near-duplicates is kept) depend on timing."""
    return latest_by_key(r for r in read_parts(out) if r.get("run") != run_id)


def _prepare(out: Path, kind: str, settings: dict, mode: str, shard: Shard) -> str:
    """Main process: clean (overwrite), write the state file and a run id; every process returns the run id."""
    if shard.main:
        if mode == "overwrite":
            _clean_previous(out)
        _state(out).mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        state = {"kind": kind, "settings": settings, "layerctl_version": __version__, "run": run_id}
        from layerctl.io.files import atomic_write

        atomic_write(
            _state(out) / STATE_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8"),
            overwrite=True,
            suffix=".json",
        )
    shard.barrier()
    return (_read_state(out) or {}).get("run", "")


# ---------------------------------------------------------------- summary / events


@dataclass
class DatasetSummary:
    kind: str
    out: str
    total: int = 0  # records planned
    written: int = 0  # records in metadata.jsonl from this plan (incl. earlier runs)
    new: int = 0  # records made in this run
    resumed: int = 0  # records finished by an earlier run and kept
    skipped: dict = field(default_factory=dict)  # reason -> count
    metadata: str = ""

    def as_json(self) -> dict:
        return {
            "event": "summary",
            "kind": self.kind,
            "out": self.out,
            "metadata": self.metadata,
            "total": self.total,
            "written": self.written,
            "new": self.new,
            "resumed": self.resumed,
            "skipped": dict(sorted(self.skipped.items())),
        }


def _summarize(kind: str, out: Path, plan_keys: list[str], final: dict[str, dict], run_id: str) -> DatasetSummary:
    s = DatasetSummary(kind=kind, out=str(out), total=len(plan_keys), metadata=str(out / METADATA))
    reasons: Counter = Counter()
    for k in plan_keys:
        row = final.get(k)
        if row is None:
            reasons["unfinished"] += 1
            continue
        if row.get("status") == "ok":
            s.written += 1
            if row.get("run") == run_id:
                s.new += 1
            else:
                s.resumed += 1
        else:
            reasons[row.get("reason", "unknown")] += 1
    s.skipped = dict(reasons)
    return s


Event = Callable[[dict], None]


def _noop(_ev: dict) -> None:
    pass
