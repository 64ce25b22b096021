"""Labelled images: where they come from, and a decoded copy on disk that every epoch reads.

Every image source (a hub dataset, an ImageFolder tree, DomainNet's domain/class tree,
Fashion-MNIST's IDX files, scikit-learn's digits) becomes the same `ImageExamples`: images at
their native size as uint8 arrays, integer labels following the sorted label names (or the
dataset's own class names), and optionally a domain per image.

Images are decoded once and written to a cache folder (`pixels.bin`, one flat uint8 file, plus
an index of offsets and shapes) that is memory-mapped, so a large dataset needs neither RAM for
all its pixels nor decoding every epoch; resizing to the model's input happens per batch
(`fedhello/data/transforms.py`). The cache key covers the source's files (names, sizes,
modification times) or the dataset's fingerprint, so changed data is decoded again. An image
that cannot be decoded is reported with its path and skipped; the run counts it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import logging
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.config import DataConfig
from fedhello.data.sources import (
    chosen_source,
    hf_labels,
    label_ids,
    load_hf_split,
    require_two_classes,
    subsample,
)
from fedhello.errors import UserError
from fedhello.registry import Registry

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_HINT = (
    "install them with `apt-get update && apt-get install -y dataset-fashion-mnist` (Debian, as root), "
    "or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist there"
)
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ImageStore:
    """Images of different sizes in one flat uint8 buffer (memory-mapped from the cache)."""

    pixels: np.ndarray  # uint8, flat
    offsets: np.ndarray  # int64, start of each image in `pixels`
    shapes: np.ndarray  # int64 (n, 3): height, width, channels

    def __len__(self) -> int:
        return len(self.offsets)

    def image(self, i: int) -> np.ndarray:
        """Image i as a (height, width, channels) uint8 array (a view, no copy)."""
        h, w, c = (int(x) for x in self.shapes[i])
        start = int(self.offsets[i])
        return self.pixels[start : start + h * w * c].reshape(h, w, c)

    def subset(self, rows: np.ndarray) -> ImageStore:
        return ImageStore(self.pixels, self.offsets[rows], self.shapes[rows])


@dataclass(frozen=True)
class ImageExamples:
    """Images with integer labels; `label_names[i]` names label id i, `domain_names[d]` domain d."""

    images: ImageStore
    labels: np.ndarray  # int64 (n,)
    label_names: list[str]
    domains: np.ndarray | None = None  # int64 (n,) or None
    domain_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images that failed to decode

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, rows: np.ndarray) -> ImageExamples:
        rows = np.asarray(rows, dtype=np.int64)
        domains = None if self.domains is None else self.domains[rows]
        return replace(self, images=self.images.subset(rows), labels=self.labels[rows], domains=domains)


# --- a source: what to decode, without decoding it -------------------------------------------------

Decoder = Callable[[], np.ndarray]  # decodes one image to (h, w, c) uint8, raising on a bad file


@dataclass
class _Source:
    """Everything about a source except its pixels: cheap to build, fixes the cache key."""

    where: str  # what error messages name, e.g. "data.path /data/pets"
    key: dict[str, Any]  # identifies the data (files and their sizes/times, a fingerprint)
    decoders: Sequence[Decoder]
    name_of: Callable[[int], str]  # image i's path (or "source#i"), for reporting failures
    labels: np.ndarray
    label_names: list[str]
    domains: np.ndarray | None = None
    domain_names: list[str] = field(default_factory=list)


ImageSource = Callable[[DataConfig], "_Source"]
IMAGE_SOURCES: Registry[ImageSource] = Registry("image source", "data.source")


def register_image_source(name: str) -> Callable[[ImageSource], ImageSource]:
    """Make `data.source: name` read images (task image-classification) with the decorated
    function, which returns lazy decoders (decoded once into the cache)."""
    return lambda load: IMAGE_SOURCES.register(name, load)


def load_image_examples(cfg: DataConfig, seed: int = 0) -> ImageExamples:
    """Load the images `cfg` describes (decoded once into the cache), optionally subsampled to
    `max_examples` (stratified, seeded)."""
    source = chosen_source(IMAGE_SOURCES, cfg, "task image-classification reads")(cfg)
    return subsample(_cached(source, cfg.cache_folder("images")), cfg.max_examples, seed)


# --- the cache -----------------------------------------------------------------------------------


def _cached(source: _Source, root: Path) -> ImageExamples:
    key = json.dumps({"format": CACHE_FORMAT, **source.key}, sort_keys=True, default=str)
    folder = root / hashlib.sha256(key.encode()).hexdigest()[:20]
    if not (folder / "index.npz").is_file():
        _write_cache(source, folder)
    meta = json.loads((folder / "meta.json").read_text())
    for path in meta["skipped"]:
        log.warning("skipped an image that cannot be decoded: %s", path)
    with np.load(folder / "index.npz") as index:
        offsets, shapes, kept = index["offsets"], index["shapes"], index["kept"]
    size = int(offsets[-1] + shapes[-1].prod()) if len(offsets) else 0
    pixels = np.memmap(folder / "pixels.bin", dtype=np.uint8, mode="r", shape=(size,))
    return ImageExamples(
        images=ImageStore(pixels, offsets, shapes),
        labels=source.labels[kept],
        label_names=source.label_names,
        domains=None if source.domains is None else source.domains[kept],
        domain_names=source.domain_names,
        skipped=list(meta["skipped"]),
    )


def _write_cache(source: _Source, folder: Path) -> None:
    """Decode every image into a temporary folder, then rename it into place: a killed run or two
    runs decoding at once never leave a half-written cache behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".decoding-", dir=folder.parent))
    try:
        offsets: list[int] = []
        shapes: list[tuple[int, ...]] = []
        kept: list[int] = []
        skipped: list[str] = []
        position = 0
        with (tmp / "pixels.bin").open("wb") as out:
            for i, decode in enumerate(source.decoders):
                try:
                    image = decode()
                except Exception as e:  # any decoder failure means this one image is unusable
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    skipped.append(f"{source.name_of(i)}: {reason}")
                    continue
                out.write(image.tobytes())
                offsets.append(position)
                shapes.append(image.shape)
                kept.append(i)
                position += image.size
        if not kept:
            raise UserError(f"{source.where}: none of the {len(source.decoders)} images could be decoded")
        np.savez(
            tmp / "index.npz",
            offsets=np.asarray(offsets, dtype=np.int64),
            shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 3),
            kept=np.asarray(kept, dtype=np.int64),
        )
        (tmp / "meta.json").write_text(json.dumps({"skipped": skipped}))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "index.npz").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- decoding ------------------------------------------------------------------------------------


def to_uint8_array(image: Any) -> np.ndarray:
    """A PIL image or an array as (h, w, c) uint8 with c = 1 (greyscale) or 3 (colour).

    Palette, alpha and CMYK images become RGB; 16-bit and float greyscale become 8-bit."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image.load()  # decode now: a truncated file fails here, not later
        if image.mode not in ("L", "RGB"):
            grey = image.mode in ("1", "I", "I;16", "I;16B", "I;16L", "F", "LA", "La")
            image = image.convert("L" if grey else "RGB")
        array = np.asarray(image)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
                raise ValueError(f"not an image array (dtype {array.dtype})")
            scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
            array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"not an image: array of shape {array.shape}")
    return np.ascontiguousarray(array[:, :, :3])


def _decode_file(path: Path) -> Decoder:
    def decode() -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            return to_uint8_array(image)

    return decode


# --- sources -------------------------------------------------------------------------------------


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    return frozenset(Image.registered_extensions())


@register_image_source("image_folder")
@register_image_source("domain_folder")
def _folder_source(cfg: DataConfig) -> _Source:
    """ImageFolder (`root/<class>/<image>`) or, for domain_folder, `root/<domain>/<class>/<image>`."""
    assert cfg.path is not None
    root = Path(cfg.path).expanduser()
    where = f"data.path {cfg.path}"
    if not root.is_dir():
        raise UserError(f"{where}: not a folder")
    with_domains = cfg.source == "domain_folder"
    layout = "root/<domain>/<class>/<image>" if with_domains else "root/<class>/<image>"
    suffixes = _image_suffixes()

    def subfolders(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    entries: list[tuple[Path, str, str]] = []  # (file, class, domain)
    for domain_dir in subfolders(root) if with_domains else [root]:
        for class_dir in subfolders(domain_dir):
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and file.suffix.lower() in suffixes and not file.name.startswith("."):
                    entries.append((file, class_dir.name, domain_dir.name))
    if not entries:
        raise UserError(f"{where}: no images found (expected {layout})")
    files = [e[0] for e in entries]
    labels, label_names = label_ids([e[1] for e in entries])
    domains, domain_names = label_ids([e[2] for e in entries]) if with_domains else (None, [])
    require_two_classes(labels, where)
    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return _Source(
        where=where,
        key={"source": cfg.source, "root": str(root.resolve()), "files": stats},
        decoders=[_decode_file(f) for f in files],
        name_of=lambda i: str(files[i]),
        labels=labels,
        label_names=label_names,
        domains=domains,
        domain_names=domain_names,
    )


def _read_idx(path: Path, where: str) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip-compressed or not."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, ValueError, EOFError, struct.error, gzip.BadGzipFile) as e:
        raise UserError(f"{where}: {path.name}: cannot read IDX data ({e})") from None


@register_image_source("fashion_mnist")
def _fashion_mnist_source(cfg: DataConfig) -> _Source:
    """Fashion-MNIST's 60,000 training and 10,000 test images together; fedhello's own stratified
    split then draws validation and test sets from them."""
    folder = Path(cfg.path or FASHION_MNIST_DIR).expanduser()
    where = f"data.path {folder}"
    names = [
        f"{part}-{kind}" for part in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    candidates = {
        n: next((folder / (n + s) for s in (".gz", "") if (folder / (n + s)).is_file()), None) for n in names
    }
    missing = [n for n, f in candidates.items() if f is None]
    if missing:
        raise UserError(f"{where}: Fashion-MNIST IDX files not found ({missing[0]}.gz); {FASHION_MNIST_HINT}")
    found = {n: f for n, f in candidates.items() if f is not None}
    files = list(found.values())
    images_parts, label_parts = [], []
    for part in ("train", "t10k"):
        images = _read_idx(found[f"{part}-images-idx3-ubyte"], where)
        labels = _read_idx(found[f"{part}-labels-idx1-ubyte"], where)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{where}: {part} images and labels do not match")
        images_parts.append(images)
        label_parts.append(labels)
    pixels = np.concatenate(images_parts)
    labels = np.concatenate(label_parts).astype(np.int64)
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{where}: labels above {len(FASHION_MNIST_CLASSES) - 1}")
    return _Source(
        where=where,
        key={
            "source": "fashion_mnist",
            "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        },
        decoders=[_array_decoder(pixels, i) for i in range(len(pixels))],
        name_of=lambda i: f"{folder}#{i}",
        labels=labels,
        label_names=list(FASHION_MNIST_CLASSES),
    )


def _array_decoder(images: np.ndarray, i: int) -> Decoder:
    return lambda: to_uint8_array(images[i])


@register_image_source("digits")
def _digits_source(cfg: DataConfig) -> _Source:
    """scikit-learn's 1,797 8x8 digits, read from the package's data file (values 0..16 scaled
    to 0..255) without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is None or not path.is_file():
        raise UserError(
            "data.source digits: scikit-learn is not installed; run: pip install --no-deps scikit-learn"
        )
    table = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.float64)
    pixels = np.clip(np.rint(table[:, :-1] * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 8, 8)
    labels = table[:, -1].astype(np.int64)
    return _Source(
        where="data.source digits",
        key={"source": "digits", "file": (str(path), path.stat().st_size, path.stat().st_mtime_ns)},
        decoders=[_array_decoder(pixels, i) for i in range(len(pixels))],
        name_of=lambda i: f"digits#{i}",
        labels=labels,
        label_names=[str(d) for d in range(10)],
    )


@register_image_source("hf")
def _hf_source(cfg: DataConfig) -> _Source:
    """A dataset saved with `save_to_disk`, or a hub dataset by name (e.g. cifar100 with
    image_column img and label_column fine_label)."""
    import datasets

    assert cfg.path is not None
    where = f"data.path {cfg.path}"
    dataset = load_hf_split(cfg.path, cfg.hf_split, cfg.hf_config)
    columns = [cfg.image_column, cfg.label_column] + ([cfg.domain_column] if cfg.domain_column else [])
    for column in columns:
        if column not in dataset.column_names:
            raise UserError(
                f"{where}: missing column '{column}' (columns: {', '.join(dataset.column_names)})"
            )
    if isinstance(dataset.features[cfg.image_column], datasets.Image):
        # decode ourselves, one image at a time, so that one corrupt image is skipped, not fatal
        dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    labels, label_names = hf_labels(dataset, cfg.label_column, where)
    domains, domain_names = (
        (None, []) if not cfg.domain_column else label_ids(list(dataset[cfg.domain_column]))
    )
    return _Source(
        where=where,
        key={
            "source": "hf",
            "fingerprint": getattr(dataset, "_fingerprint", None) or cfg.path,
            "split": cfg.hf_split,
            "config": cfg.hf_config,
            "columns": columns,
        },
        decoders=[_hf_decoder(dataset, cfg.image_column, i) for i in range(len(dataset))],
        name_of=lambda i: _hf_image_name(dataset[i][cfg.image_column], f"{cfg.path}#{i}"),
        labels=labels,
        label_names=label_names,
        domains=domains,
        domain_names=domain_names,
    )


def _hf_image_name(value: Any, fallback: str) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"{fallback} ({value['path']})"
    return fallback


def _hf_decoder(dataset: Any, column: str, i: int) -> Decoder:
    """Reads row i when called: the dataset's images are never all in memory at once."""

    def decode() -> np.ndarray:
        from PIL import Image

        value = dataset[i][column]
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                with Image.open(io.BytesIO(value["bytes"])) as image:
                    return to_uint8_array(image)
            if value.get("path"):
                with Image.open(value["path"]) as image:
                    return to_uint8_array(image)
            raise ValueError("no image data")
        return to_uint8_array(value)

    return decode
