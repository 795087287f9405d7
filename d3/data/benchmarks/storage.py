"""Benchmark storage: a dataset root read as a folder or an uncompressed tar, and the file decoders."""


from __future__ import annotations


import io
import os
import tarfile
import weakref
from pathlib import Path


import numpy as np
from PIL import Image


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# Storage: a folder or an uncompressed tar
# ----------------------------------------------------------------------------------------------

class Source:
    """Read-only view of a dataset root as relative POSIX paths."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def files(self) -> list[str]:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds open (an archive); reading afterwards is an error."""

    @staticmethod
    def open(path: Path) -> Source:
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise ValueError(f"{path}: expected a dataset folder or an uncompressed .tar archive")
            return TarSource(path)
        return FolderSource(path)


class FolderSource(Source):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        if self._files is None:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = Path(dirpath).relative_to(self.path).as_posix()
                for f in filenames:
                    if not f.startswith("."):
                        out.append(f if rel_dir == "." else f"{rel_dir}/{f}")
            self._files = sorted(out)
        return self._files

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path / rel}: file missing") from None


class TarSource(Source):
    """Members are indexed once; names are normalised without the leading ``./``. The archive stays open until
    ``close()`` or until the source is garbage-collected (no file is left to the interpreter to close)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tar = tarfile.open(path, "r:*")  # distributed uncompressed; a compressed copy works, slowly
        self._closer = weakref.finalize(self, self._tar.close)  # runs once: at close() or at collection
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in self._tar.getmembers():
            if m.isfile():
                name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
                self._members[name] = m

    def files(self) -> list[str]:
        return sorted(self._members)

    def exists(self, rel: str) -> bool:
        return rel in self._members

    def read(self, rel: str) -> bytes:
        member = self._members.get(rel)
        if member is None:
            raise FileNotFoundError(f"{self.path}: member ./{rel} missing from the archive")
        f = self._tar.extractfile(member)
        assert f is not None
        return f.read()

    def close(self) -> None:
        self._closer()


# ----------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------

def decode_image(data: bytes) -> np.ndarray:
    """Any PIL-readable image as a NumPy array, unchanged (uint8, uint16/int32 for 16-bit PNGs)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def decode_rgb(data: bytes) -> np.ndarray:
    """uint8 HxWx3 (grey, palette and RGBA images are converted; alpha is dropped)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8).copy()


def decode_png_unit(data: bytes) -> np.ndarray:
    """A grey-level PNG as float64 in [0, 1]: 8-bit /255, 16-bit /65535, colour -> channel mean."""
    arr = decode_image(data)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64).mean(-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.int64, np.uint32):
        return arr.astype(np.float64) / 65535.0
    return arr.astype(np.float64)


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
