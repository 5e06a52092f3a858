"""Make a toy world built by build_world.py the bundled toy model: copy its nine weight files into
layerctl/toy_weights (or --dst) and record how they were trained in training.json.

    python recipes/toy/build_world.py --out runs/toy/w64 --threads 1
    python recipes/toy/ship_world.py runs/toy/w64
    python recipes/toy/ship_world.py runs/toy/w64 --replace fg2bg=runs/toy/train-lora-fg2bg-w64-3/layers_fg2bg.safetensors

A set ships whole or not at all: every LoRA is tied to the base UNet and VAE it was trained over, so the
folder's world.json must say every stage is done. Each file must be fp16 (the package stays small); the
LoRAs' `base_model` metadata, the folder they were trained in, becomes `toy`. --replace ships a later stage's
file for one part (a layer model trained on from the folder's own, say) and names it in training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_world import STAGES  # noqa: E402  # the stages a finished world has done

from layerctl.backends import toy  # noqa: E402

PARTS = {**toy.FILES, **toy.LAYER_FILES}  # part -> file name, as the toy backend loads them


def fail(msg: str):
    print(f"ship_world.py: {msg}", file=sys.stderr)
    sys.exit(2)


def check_fp16(path: Path) -> dict:
    """The file's metadata, after making sure every tensor in it is fp16."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            kinds = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except (OSError, SafetensorError) as exc:
        fail(f"{path}: not a readable safetensors file ({exc})")
    if kinds != {"F16"}:
        fail(f"{path}: tensors of {sorted(kinds)}, the package ships fp16 only")
    return meta


def ship_file(src: Path, dst: Path, meta: dict) -> None:
    """Copy src (its metadata `meta`, read by check_fp16) to dst, a LoRA's base_model set to 'toy'."""
    if "layerctl" not in meta:
        shutil.copyfile(src, dst)
        return
    from safetensors.torch import load_file, save_file

    info = json.loads(meta["layerctl"])
    info["base_model"] = "toy"
    save_file(load_file(src), dst, metadata={**meta, "layerctl": json.dumps(info, sort_keys=True)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("world", type=Path, help="a folder build_world.py finished")
    ap.add_argument("--dst", type=Path, default=ROOT / "layerctl" / "toy_weights")
    ap.add_argument("--replace", action="append", default=[], metavar="PART=FILE",
                    help=f"ship FILE as PART ({', '.join(PARTS)}) instead of the folder's")
    args = ap.parse_args(argv)
    try:
        world = json.loads((args.world / "world.json").read_text())
    except (OSError, ValueError) as exc:
        fail(f"{args.world}: no readable world.json ({exc}); is it a folder build_world.py made?")
    undone = [s for s in STAGES if not world.get("stages", {}).get(s, {}).get("done")]
    if undone:
        fail(f"{args.world}: stages not done: {', '.join(undone)} (a toy set ships whole)")
    sources = {part: args.world / name for part, name in PARTS.items()}
    for item in args.replace:
        part, sep, file = item.partition("=")
        if not sep or part not in PARTS:
            fail(f"--replace {item!r}: expected PART=FILE with PART one of {', '.join(PARTS)}")
        sources[part] = Path(file)
    metas = {}
    for part, src in sources.items():  # all checked before anything is written
        if not src.is_file():
            fail(f"{src}: missing ({part})")
        metas[part] = check_fp16(src)
    record = json.loads((args.world / "training.json").read_text()) if (args.world / "training.json").is_file() else {}
    record.update(world=str(args.world), size=world.get("size"), stages=world["stages"],
                  replaced={part: str(sources[part]) for part in (i.partition("=")[0] for i in args.replace)})
    args.dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dst, prefix=".ship-") as staging:  # written whole, then moved in
        for part, src in sources.items():
            ship_file(src, Path(staging) / PARTS[part], metas[part])
        (Path(staging) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        for name in [*PARTS.values(), "training.json"]:
            os.replace(Path(staging) / name, args.dst / name)
    print(f"ship_world.py: {args.world} -> {args.dst} ({len(PARTS)} files and training.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
