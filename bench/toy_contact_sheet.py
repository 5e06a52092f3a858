"""Contact sheet of the bundled toy model: docs/toy-model.png (issue 14).

    python bench/toy_contact_sheet.py                       # the shipped weights -> docs/toy-model.png
    python bench/toy_contact_sheet.py --layer-weights DIR --out /tmp/sheet.png   # candidate layer files
    python bench/toy_contact_sheet.py --model toy:DIR --out /tmp/sheet.png       # a candidate set of toy weights

One row per picture a newcomer makes, seeds 0-3 across, every tile generated through `Session.gen`
exactly as `layerctl gen` (defaults: 20 steps, the model's CFG (toy: 3), 8-way TTA). Transparent tiles are shown as
the checkerboard preview (the same tones as `gen --preview`, 8-px cells at 64 px), scaled 3x with
nearest-neighbour so that single pixels stay visible:

- `gen "glass cup"` and `gen "red ball"` (the README's main job);
- `gen --joint "red ball on a table" --fg-prompt "red ball" --bg-prompt table`: fg, bg, blended;
- `gen --bg <a street scene> "glass bottle on a street" --fg-prompt "glass bottle"`: fg, blended
  (the given background is the toy world's, SceneSource(777) scene 0's kind: a street);
- `gen --fg <a toy "blue heart"> "blue heart on the grass" --bg-prompt grass`: bg, blended.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALE = 3
TILE = 64 * SCALE
LABEL_W = 300
PAD = 6


def _known_images(tmp: Path) -> tuple[str, str]:
    """A street background and a blue-heart foreground from the toy world (seeds no training stage uses)."""
    from PIL import Image

    from layerctl.training.scenes import SceneSource

    street = SceneSource(seed=777, backgrounds=["street"])(0)
    heart = SceneSource(seed=778, shapes=["heart"], materials=["solid"], colours=["blue"])(0)
    bg, fg = tmp / "street.png", tmp / "heart.png"
    Image.fromarray(np.clip(np.rint(street.bg * 255), 0, 255).astype(np.uint8), "RGB").save(bg)
    Image.fromarray(np.clip(np.rint(heart.fg * 255), 0, 255).astype(np.uint8), "RGBA").save(fg)
    return str(bg), str(fg)


def rows_spec(bg_path: str, fg_path: str) -> list[dict]:
    return [
        {"label": 'gen "glass cup"', "req": {"prompt": "glass cup"}, "role": "out"},
        {"label": 'gen "red ball"', "req": {"prompt": "red ball"}, "role": "out"},
        {"label": "--joint: fg", "req": {"prompt": "red ball on a table", "fg_prompt": "red ball", "bg_prompt": "table", "joint": True},
         "role": "fg", "group": "joint"},
        {"label": "--joint: bg", "group": "joint", "role": "bg"},
        {"label": "--joint: blended", "group": "joint", "role": "blended"},
        {"label": "--bg street: fg", "req": {"prompt": "glass bottle on a street", "fg_prompt": "glass bottle", "bg": bg_path},
         "role": "fg", "group": "bg2fg"},
        {"label": "--bg street: blended", "group": "bg2fg", "role": "blended"},
        {"label": "--fg blue heart: bg", "req": {"prompt": "blue heart on the grass", "bg_prompt": "grass", "fg": fg_path},
         "role": "bg", "group": "fg2bg"},
        {"label": "--fg blue heart: blended", "group": "fg2bg", "role": "blended"},
    ]


def tile(path: Path) -> np.ndarray:
    from PIL import Image

    from layerctl.core.imagemath import checkerboard

    arr = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    if arr.shape[-1] == 4:
        arr = checkerboard(arr, cell=8)
    arr = np.repeat(np.repeat(arr[..., :3], SCALE, axis=0), SCALE, axis=1)
    return np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "toy-model.png"))
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--model", default="toy", help="toy:DIR for a candidate set of toy weights")
    ap.add_argument("--layer-weights", default=None, help="folder with candidate rgba/joint/fg2bg/bg2fg.safetensors")
    ap.add_argument("--decoder", default=None, help="candidate transparent decoder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    from PIL import Image, ImageDraw

    from layerctl.api import Session
    from layerctl.requests import GenRequest

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="toysheet-"))
    spec = rows_spec(*_known_images(tmp))
    paths: dict[tuple[str, int], dict[str, Path]] = {}
    with Session(quiet=True) as s:
        for row in spec:
            if "req" not in row:
                continue
            key = row.get("group") or row["label"]
            mode = row.get("group") or "rgba"
            extra = {}
            if args.decoder:
                extra["transparent_decoder"] = args.decoder
            if args.layer_weights and (Path(args.layer_weights) / f"{mode}.safetensors").is_file():
                extra["layer_weights"] = str(Path(args.layer_weights) / f"{mode}.safetensors")
            for seed in seeds:
                if row["role"] == "out":
                    out = tmp / f"{key}_{seed}.png".replace(" ", "_").replace('"', "")
                    s.gen(GenRequest(model=args.model, out=str(out), seed=seed, device="cpu", overwrite=True, **row["req"], **extra))
                    paths[(key, seed)] = {"out": out}
                else:
                    d = tmp / f"{key}_{seed}"
                    s.gen(GenRequest(model=args.model, out_dir=str(d), seed=seed, device="cpu", overwrite=True, **row["req"], **extra))
                    paths[(key, seed)] = {r: d / f"{r}.png" for r in ("fg", "bg", "blended")}
    width = LABEL_W + len(seeds) * (TILE + PAD) + PAD
    height = 30 + len(spec) * (TILE + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, seed in enumerate(seeds):
        draw.text((LABEL_W + PAD + j * (TILE + PAD) + TILE // 2 - 20, 10), f"seed {seed}", fill=(0, 0, 0))
    for i, row in enumerate(spec):
        y = 30 + i * (TILE + PAD)
        draw.text((PAD, y + TILE // 2 - 6), row["label"], fill=(0, 0, 0))
        key = row.get("group") or row["label"]
        for j, seed in enumerate(seeds):
            sheet.paste(Image.fromarray(tile(paths[(key, seed)][row["role"]])), (LABEL_W + PAD + j * (TILE + PAD), y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
