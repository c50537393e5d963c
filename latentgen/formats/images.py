"""Image files that carry how they were made: PNG text chunks (A1111's `parameters` text and latentgen's own JSON)
or, for JPEG/WebP, EXIF UserComment as A1111 writes it; written and read back. What the text says is
`latentgen.generation.infotext`.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentgen.errors import UserError

METADATA_KEY = "latentgen"
EXIF_USER_COMMENT = 0x9286  # in the Exif sub-IFD (0x8769), where A1111 puts `parameters` of JPEG/WebP images
EXIF_IFD = 0x8769


def image_metadata(meta: dict, suffix: str, parameters: str) -> dict:
    """Keyword arguments for PIL's `save` that carry an image's metadata in the file's format: PNG text chunks
    (A1111's `parameters` text and `meta` as our JSON), or for JPEG/WebP the `parameters` text in EXIF UserComment
    as A1111 writes it (piexif's UserComment.dump, 'unicode': an 8-byte charset code, then UTF-16 big-endian)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if suffix.lower() not in (".jpg", ".jpeg", ".webp"):
        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text(METADATA_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return {"exif": exif.tobytes()}


def _exif_parameters(im) -> str | None:
    comment = im.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, str):
        return comment
    if not comment:
        return None
    code, body = comment[:8], comment[8:]
    if code.startswith(b"UNICODE"):
        return body.decode("utf-16-be" if not body.startswith(b"\xff\xfe") else "utf-16", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def read_metadata(path: str | Path) -> dict:
    """What an image says about how it was made: {"latentgen": our JSON} for images infer.py wrote as PNG, else
    {"parameters": A1111's text} (PNG text chunk or EXIF UserComment, as AUTOMATIC1111 and infer.py write it)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            ours = im.info.get(METADATA_KEY) or getattr(im, "text", {}).get(METADATA_KEY)
            parameters = im.info.get("parameters") or _exif_parameters(im)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if ours:
        try:
            meta = json.loads(ours)
        except json.JSONDecodeError:
            raise UserError(f"{path} has damaged latentgen metadata") from None
        if "num_inference_steps" in meta or not parameters:  # else written before the Request names: use A1111's
            return {METADATA_KEY: meta}
    if parameters:
        return {"parameters": parameters}
    raise UserError(f"{path} has no generation parameters (neither latentgen's nor AUTOMATIC1111's)")


def file_sha256(path: str | Path, length: int = 16) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:length]
