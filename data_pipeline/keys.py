"""Which tar members of a sample hold its image and its label (``data.image_key`` / ``data.label_key``).

Shards written by others name their members differently: ``KEY.jpg`` + ``KEY.cls`` (ours, timm's),
``KEY.webp`` + ``KEY.json`` with ``{"label": 3}`` (many exports), compound names such as
``KEY.input.jpg`` / ``KEY.seg.png`` (webdataset cuts the key at the first dot of the base name, so
the member's extension is ``input.jpg``). A :class:`SampleKeys` says where to look:

- ``image_key``: extensions separated by ``;``, each matched against the *whole* extension after
  the key (``jpg`` does not match ``input.jpg``; name ``input.jpg`` to take it). A sample with
  several matching members takes the first extension of the list, whatever the member order in
  the tar, so the choice is deterministic.
- ``label_key``: an extension whose member holds an ASCII integer (``cls``), or ``EXT:FIELD`` for
  a field of a JSON member (``json:label``; ``json:annotations.label`` walks nested objects).
  A missing member or field, a JSON ``null`` or a negative number means *unlabelled* (label -1,
  counted by the loaders); text that is not an integer is a bad sample (``bad_label``).

Instances are small frozen dataclasses, so they travel to DataLoader worker processes by pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .augment import BadImage
from .tario import IMAGE_EXTS

__all__ = ["SampleKeys", "DEFAULT_IMAGE_KEY", "DEFAULT_LABEL_KEY", "DEFAULT_KEYS", "parse_keys"]

# every extension the loader accepted before image_key existed, in its order of preference
DEFAULT_IMAGE_KEY = ";".join(IMAGE_EXTS)
DEFAULT_LABEL_KEY = "cls"


@dataclass(frozen=True)
class SampleKeys:
    image_exts: tuple[str, ...] = IMAGE_EXTS
    label_ext: str = "cls"
    label_field: tuple[str, ...] = ()  # empty: the member itself is the integer

    @property
    def image_key(self) -> str:
        return ";".join(self.image_exts)

    @property
    def label_key(self) -> str:
        return self.label_ext + (":" + ".".join(self.label_field) if self.label_field else "")

    def image(self, members: dict[str, bytes]) -> bytes | None:
        """The first configured image member's bytes, or None when the sample has none."""
        for ext in self.image_exts:
            if ext in members:
                return members[ext]
        return None

    def has_image(self, exts) -> bool:
        return any(e in exts for e in self.image_exts)

    def label(self, members: dict[str, bytes]) -> int:
        """The sample's label; -1 when unlabelled; BadImage(bad_label) when not an integer."""
        raw = members.get(self.label_ext)
        if raw is None:
            return -1
        if not self.label_field:
            try:
                value = int(raw.decode().strip())
            except (ValueError, UnicodeDecodeError):
                raise BadImage("bad_label", f"non-integer .{self.label_ext} {raw[:20]!r}") from None
            return value if value >= 0 else -1
        try:
            node = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadImage("bad_label", f".{self.label_ext} is not JSON ({raw[:20]!r})") from None
        for part in self.label_field:
            if not isinstance(node, dict) or part not in node:
                return -1  # the field is absent: unlabelled, as a missing .cls is
            node = node[part]
        if node is None:
            return -1
        if isinstance(node, bool) or not isinstance(node, (int, str)) and not (
                isinstance(node, float) and node.is_integer()):
            raise BadImage("bad_label", f"{self.label_key} is {node!r}, not an integer")
        try:
            value = int(node)
        except ValueError:
            raise BadImage("bad_label", f"{self.label_key} is {node!r}, not an integer") from None
        return value if value >= 0 else -1


DEFAULT_KEYS = SampleKeys()


def parse_keys(image_key: str | None = None, label_key: str | None = None) -> SampleKeys:
    """A :class:`SampleKeys` from the config strings; ValueError (one line) for malformed ones."""
    image_key = DEFAULT_IMAGE_KEY if image_key is None else image_key
    label_key = DEFAULT_LABEL_KEY if label_key is None else label_key
    exts = tuple(e.strip().lower().lstrip(".") for e in image_key.split(";") if e.strip())
    if not exts or any(not e or "/" in e for e in exts):
        raise ValueError(f"image_key={image_key!r} must list member extensions separated by ';', "
                         "e.g. 'jpg;png' or 'input.jpg'")
    ext, sep, fld = label_key.partition(":")
    ext = ext.strip().lower().lstrip(".")
    parts = tuple(p for p in fld.strip().split(".") if p) if fld else ()
    if not ext or "/" in ext or (sep and not parts):
        raise ValueError(f"label_key={label_key!r} must be a member extension ('cls') or "
                         "EXT:FIELD for a field of a JSON member ('json:label')")
    if ext in exts:
        raise ValueError(f"label_key={label_key!r} names an image member ({ext}); pick another")
    return SampleKeys(exts, ext, parts)
