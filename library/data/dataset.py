"""Image + caption datasets, image loading and the VAE latent cache.

Two on-disk layouts are understood, both common in the LoRA world:

* **kohya layout** — every image ``x.png`` sits next to a caption file ``x.txt``, either directly in the
  dataset root (repeats 1) or in ``<repeats>_<name>`` subfolders (``10_pokemon/`` = every image seen 10 times
  per epoch).
* **Hugging Face imagefolder** — a ``metadata.jsonl`` in the root whose lines name a ``file_name`` (relative to
  the root) and hold the caption in a text column (``text`` by default).

Records are always sorted by their path relative to the root, so every scan of the same folder yields the
same order on every machine; membership splits (:mod:`library.data.splits`) are chosen by file, never by index.

Latents are encoded once with the VAE and cached (memory, optionally disk). A cache entry is keyed on the
image's bytes, the VAE's fingerprint, the resolution and the encoding mode, so a changed image, VAE or
resolution can never be served a stale latent.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from library.errors import DataError
from library.fileio import atomic_write_path, sha256_file

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageCaption:
    """One training image and its caption; ``repeats`` comes from a kohya ``<repeats>_<name>`` folder."""

    path: Path
    caption: str
    repeats: int = 1


# ---------------------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def read_caption_file(path: Path) -> str:
    """Return the first non-blank line of a caption file, stripped.

    Only the first line is used (as kohya does) so that a trailing newline or notes below never leak into
    the prompt. An empty / whitespace-only file is an error rather than an empty prompt: training on "" would
    silently turn a captioned LoRA into an unconditional one.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"caption file {path} is missing: write the image's caption into it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read caption file {path}: {exc} (save it as UTF-8 text)") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise DataError(f"caption file {path} is empty: write the image's caption into it or remove the image")


def _scan_folder(folder: Path, caption_extension: str, repeats: int) -> list[ImageCaption]:
    records = []
    for image in sorted(p for p in folder.iterdir() if _is_image(p)):
        caption_path = image.with_suffix(caption_extension)
        if not caption_path.is_file():
            raise DataError(
                f"image {image} has no caption file {caption_path.name}: write one next to it "
                f"or remove the image from the dataset"
            )
        records.append(ImageCaption(image, read_caption_file(caption_path), repeats))
    return records


def _scan_kohya(root: Path, caption_extension: str) -> list[ImageCaption]:
    records = _scan_folder(root, caption_extension, repeats=1)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEATS_DIR.match(sub.name)
        if match is None:
            # A folder without images (say a latent cache) is harmless; one with images would be silently
            # skipped by kohya's loader, so say so instead of training on a subset.
            if any(_is_image(p) for p in sub.iterdir()):
                raise DataError(
                    f"dataset subfolder {sub} does not match '<repeats>_<name>' (e.g. '1_{sub.name}'): "
                    f"rename it, or move its images into {root}"
                )
            continue
        repeats = int(match.group(1))
        if repeats < 1:
            raise DataError(f"dataset subfolder {sub} has 0 repeats: rename it to '1_{match.group(2)}' or remove it")
        records.extend(_scan_folder(sub, caption_extension, repeats))
    return records


def _scan_imagefolder(root: Path, metadata: Path, caption_column: str) -> list[ImageCaption]:
    records: dict[str, ImageCaption] = {}
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {metadata}: {exc}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg}): fix or remove that line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{where} has no 'file_name' key: every line needs file_name and {caption_column}")
        if caption_column not in row:
            raise DataError(
                f"{where} has no '{caption_column}' column (keys: {sorted(row)}): "
                f"add it or pass the right caption column"
            )
        name, caption = row["file_name"], row[caption_column]
        if not isinstance(name, str) or not isinstance(caption, str):
            raise DataError(f"{where}: file_name and {caption_column} must be strings")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{where}: file_name {name!r} must be a path inside {root}")
        image = root / name
        if not image.is_file():
            raise DataError(f"{where} names image {image}, which does not exist: restore it or remove the line")
        if not caption.strip():
            raise DataError(f"{where} has an empty caption for {name}: write one or remove the line")
        key = Path(name).as_posix()
        if key in records:
            raise DataError(f"{where} lists {name} a second time: keep one line per image")
        records[key] = ImageCaption(image, caption.strip(), 1)
    return [records[k] for k in sorted(records)]


def scan_dataset(
    root: str | Path, caption_extension: str = ".txt", *, caption_column: str = "text"
) -> list[ImageCaption]:
    """List every (image, caption) pair of a dataset folder, sorted by path relative to ``root``.

    If ``root/metadata.jsonl`` exists the folder is read as a Hugging Face imagefolder (captions from
    ``caption_column``); otherwise as a kohya folder (same-stem caption files, optional ``<repeats>_<name>``
    subfolders). Raises :class:`DataError` naming the offending file for a missing or empty caption, a
    metadata line naming a missing image, or a dataset with no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    metadata = root / METADATA_FILE
    if metadata.is_file():
        records = _scan_imagefolder(root, metadata, caption_column)
    else:
        records = _scan_kohya(root, caption_extension)
    if not records:
        raise DataError(
            f"dataset folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) with captions: "
            f"put images + {caption_extension} files in it, in '<repeats>_<name>' subfolders, "
            f"or add a {METADATA_FILE}"
        )
    records.sort(key=lambda r: r.path.relative_to(root).as_posix())
    return records


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a DataLoader worker
            img = ImageOps.exif_transpose(img)  # phone photos are stored rotated, with an EXIF hint
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Dropping alpha would expose whatever colour hides under transparent pixels (often black).
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc} (re-export it or remove it from the dataset)") from None


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to ``resolution`` (Lanczos, antialiased) and cut the centred square."""
    width, height = img.size
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Load an image as a float32 tensor of shape (3, resolution, resolution) with values in [-1, 1]."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    img = resize_center_crop(_open_rgb(Path(path)), resolution)
    array = np.asarray(img, dtype=np.float32)  # (R, R, 3), 0..255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------------------
# Latent cache
# ---------------------------------------------------------------------------------------------------------

LatentMode = Literal["mean", "sample"]
_CACHE_FORMAT = "smp-lora-latent-v1"


class LatentCache:
    """VAE latents of images, cached in memory and optionally as safetensors files in ``cache_dir``.

    ``mode="mean"`` (default) stores the mean of the VAE's posterior: deterministic, so a member image
    gets the same latent in training and evaluation. ``mode="sample"`` draws one sample per image (as
    kohya's cache does) from a generator seeded by the image's cache key and ``seed``, so it is reproducible
    too. Latents are multiplied by ``vae.config.scaling_factor`` (after subtracting ``shift_factor`` if the VAE
    has one), i.e. they are what the UNet sees.

    The key of an entry is a sha256 over the image's bytes, ``vae_fingerprint``, the resolution and the mode
    (and seed in sample mode). A disk file that cannot be read or does not match is recomputed and rewritten.
    """

    def __init__(
        self,
        vae: Any,
        vae_fingerprint: str,
        resolution: int,
        cache_dir: str | Path | None = None,
        batch_size: int = 16,
        *,
        mode: LatentMode = "mean",
        seed: int = 0,
    ) -> None:
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.vae = vae
        self.vae_fingerprint = vae_fingerprint
        self.resolution = int(resolution)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.mode: LatentMode = mode
        self.seed = seed
        self._memory: dict[str, torch.Tensor] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "encoded": 0}

    # -- keys ------------------------------------------------------------------------------------------
    def key_for_hash(self, image_sha256: str) -> str:
        parts = [_CACHE_FORMAT, image_sha256, self.vae_fingerprint, str(self.resolution), self.mode]
        if self.mode == "sample":
            parts.append(str(self.seed))
        return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()

    def key(self, path: str | Path) -> str:
        """Cache key of the image at ``path`` as it is on disk now."""
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc} (restore it or remove it from the dataset)") from None
        return self.key_for_hash(digest)

    def _file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.safetensors"

    # -- disk ------------------------------------------------------------------------------------------
    def _read_disk(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        file = self._file(key)
        if not file.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
                latent = handle.get_tensor("latent")
        except Exception:  # any unreadable file is just a cache miss: we can always recompute
            return None
        if meta.get("key") != key or latent.ndim != 3 or not torch.isfinite(latent).all():
            return None
        return latent.float()

    def _write_disk(self, key: str, latent: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        from safetensors.torch import save_file

        meta = {
            "format": _CACHE_FORMAT,
            "key": key,
            "vae_fingerprint": self.vae_fingerprint,
            "resolution": str(self.resolution),
            "mode": self.mode,
        }
        with atomic_write_path(self._file(key)) as tmp:
            save_file({"latent": latent.contiguous()}, str(tmp), metadata=meta)

    # -- encoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, paths: Sequence[Path], keys: Sequence[str]) -> torch.Tensor:
        param = next(self.vae.parameters())
        pixels = torch.stack([load_image(p, self.resolution) for p in paths])
        dist = self.vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = dist.mean
        if self.mode == "sample":
            # One generator per image, seeded by its key: the sample does not depend on batch composition.
            eps = torch.stack(
                [
                    torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(int(k[:15], 16)))
                    for k in keys
                ]
            )
            latents = latents + dist.std * eps.to(device=latents.device, dtype=latents.dtype)
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        latents = latents * self.vae.config.scaling_factor
        self.stats["encoded"] += len(paths)
        return latents.float().cpu()

    def get_many(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Latents of ``paths`` in order, shape (N, C, h, w), float32 on the CPU (N may be 0)."""
        paths = [Path(p) for p in paths]
        if not paths:
            # An empty set (say an aux split of size 0) gets an empty batch of the right shape.
            config = self.vae.config
            side = self.resolution // 2 ** (len(config.block_out_channels) - 1)
            return torch.empty(0, config.latent_channels, side, side)
        keys = [self.key(p) for p in paths]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Path] = {}  # key -> a path; identical images are encoded once
        for path, key in zip(paths, keys):
            if key in found or key in missing:
                continue
            if key in self._memory:
                found[key] = self._memory[key]
                self.stats["memory_hits"] += 1
                continue
            latent = self._read_disk(key)
            if latent is not None:
                self._memory[key] = found[key] = latent
                self.stats["disk_hits"] += 1
                continue
            missing[key] = path
        todo = list(missing.items())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = self._encode([p for _, p in chunk], [k for k, _ in chunk])
            for (key, _), latent in zip(chunk, batch):
                latent = latent.clone()  # own storage, so the memory cache does not pin the whole batch
                self._write_disk(key, latent)
                self._memory[key] = found[key] = latent
        return torch.stack([found[k] for k in keys])

    def get(self, path: str | Path) -> torch.Tensor:
        """Latent of one image, shape (C, h, w)."""
        return self.get_many([path])[0]


# ---------------------------------------------------------------------------------------------------------
# Captions and a training dataset
# ---------------------------------------------------------------------------------------------------------


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random, separator: str = ",") -> str:
    """Shuffle the comma-separated tags of ``caption``, keeping the first ``keep_tokens`` tags in place.

    This is kohya's ``--shuffle_caption --keep_tokens N``: the leading tags (an identity token such as
    "cele2811") stay first, the rest are permuted so the model does not learn their order. Empty tags are
    dropped; the result is joined with ``separator + " "``.
    """
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    tags = [t.strip() for t in caption.split(separator)]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return f"{separator} ".join(head + tail)


class LatentCaptionDataset(torch.utils.data.Dataset):
    """Cached latents with their captions; items are ``(latent, caption, record_index)``.

    ``repeats`` (one int per record) lists a record that many times per epoch; the returned index is always
    the record's own index, so membership bookkeeping never sees the expanded position. Caption shuffling
    draws from a generator seeded by (seed, epoch, item), so it is identical across DataLoader worker
    counts and restarts; call :meth:`set_epoch` each epoch to get a new order.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        captions: Sequence[str],
        *,
        repeats: Sequence[int] | None = None,
        shuffle_captions: bool = False,
        keep_tokens: int = 0,
        seed: int = 0,
    ) -> None:
        if len(latents) != len(captions):
            raise ValueError(f"{len(latents)} latents but {len(captions)} captions")
        if repeats is not None and len(repeats) != len(captions):
            raise ValueError(f"{len(repeats)} repeats for {len(captions)} captions")
        self.latents = latents
        self.captions = list(captions)
        self.shuffle_captions = shuffle_captions
        self.keep_tokens = keep_tokens
        self.seed = seed
        self.epoch = 0
        counts = repeats if repeats is not None else [1] * len(captions)
        self._index = [i for i, n in enumerate(counts) for _ in range(n)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, str, int]:
        index = self._index[item]
        caption = self.captions[index]
        if self.shuffle_captions:
            rng = random.Random(f"{self.seed}:{self.epoch}:{item}")
            caption = shuffle_caption(caption, self.keep_tokens, rng)
        return self.latents[index], caption, index
