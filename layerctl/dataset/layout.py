"""Names of the dataset folder layout and of the keys its readers accept."""

IMAGE_EXTS = (".png", ".webp", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif")
METADATA = "metadata.jsonl"
STATE_DIR = ".layerctl"
STATE_FILE = "dataset.json"
CAPTION_KEYS = ("caption", "text", "prompt")
FILE_KEYS = ("file_name", "file", "image", "path", "filename")
LAYER_DIRS = ("fg", "bg", "blended", "intermediate", "mask")
