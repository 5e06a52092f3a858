"""Training datasets: RGBA ingestion and the multi-layer construction by inpainting.

Two jobs, each a validated request plus a function (the CLI and recipes call
the same ones):

    from layerctl.dataset import RgbaDatasetRequest, build_rgba_dataset
    summary = build_rgba_dataset(RgbaDatasetRequest(sources=["cutouts/"], out="data/rgba"))

    from layerctl.dataset import LayersDatasetRequest, build_layers_dataset
    summary = build_layers_dataset(LayersDatasetRequest(rgba_dir="data/rgba", out="data/layers",
                                                        backgrounds=["a beach"], model="tiny"))

Modules: `requests` (the two validated requests), `images` (pixel helpers),
`state` (the output folder's state, part files, merge, shards), `rgba`, `layers`;
`layout` holds the folder names.

Layouts (documented for users and for the readers in docs/datasets.md):

- rgba: a Hugging Face *imagefolder*: ``OUT/<name>.png`` plus ``OUT/metadata.jsonl``
  with one object per image: file_name, caption, width, height, alpha_coverage,
  source, hash (sha256 of the source file, 16 hex) and phash (perceptual hash).
- layers: ``OUT/metadata.jsonl``, one object per record, with paths relative to
  OUT: fg (RGBA), bg, blended, intermediate, mask; fg_prompt, bg_prompt, prompt;
  id, hash, seed, and how every stage was made.

Both are resumable: finished records are appended, one JSON line each, to
``OUT/.layerctl/part-<rank>.jsonl`` right after their files are written;
``metadata.jsonl`` is (re)written from those at the end of a run. Work is
split across ``accelerate launch`` processes by record position (each record
exactly once); the main process merges.
"""


from layerctl.dataset.images import (  # noqa: F401
    HASH_BITS, alpha_coverage, choose_bucket, composite_rgb, dilate, erode, feather_inside, fit_to_bucket,
    hash_distance, perceptual_hash, place_on_canvas, resize_rgba, sha16,
)
from layerctl.dataset.layers import (  # noqa: F401
    Foreground, LayerRecord, RecordJob, build_layers_dataset, default_model_ref, find_foregrounds, make_layer_record,
    plan_layer_jobs, read_backgrounds, read_layer_records, read_prompt_records,
)
from layerctl.dataset.layout import IMAGE_EXTS, METADATA, STATE_DIR, STATE_FILE  # noqa: F401
from layerctl.dataset.requests import LayersDatasetRequest, RgbaDatasetRequest  # noqa: F401
from layerctl.dataset.rgba import Source, build_rgba_dataset, caption_for, find_sources, load_captions  # noqa: F401
from layerctl.dataset.state import DatasetSummary, Shard, check_out_dir, read_parts  # noqa: F401
