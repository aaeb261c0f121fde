"""A strict, streaming reader for ``.safetensors`` files (no torch, bf16/fp8 via ml_dtypes).

The header is validated completely on open (a truncated or corrupt file raises
``CheckpointFormatError`` before anything is converted); tensors are then read one at a time
with plain file reads into a fresh array that the reader does not keep. No memory map: the
pages of a mapped file count in the process's resident memory until it is unmapped, so
converting a 9 GB T5 through one would look (and, under a memory limit, be) 9 GB bigger.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointFormatError(ValueError):
    """A checkpoint file is unreadable: truncated, corrupt header, unsupported dtype."""


class SafetensorsFile:
    """Header of one ``.safetensors`` file plus lazy, validated tensor reads.

    ``shape(key)``, ``dtype(key)`` need no data; ``get(key)`` returns a fresh numpy array in
    the stored dtype (bf16 as ``ml_dtypes.bfloat16``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointFormatError(f"{self.path}: file is truncated ({size} bytes, no safetensors header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointFormatError(
                    f"{self.path}: header length {header_len} does not fit in the file ({size} bytes): "
                    "truncated or not a safetensors file"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointFormatError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointFormatError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            try:
                dtype_name, shape, (begin, end) = (
                    entry["dtype"],
                    tuple(int(s) for s in entry["shape"]),
                    entry["data_offsets"],
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointFormatError(
                    f"{self.path}: corrupt header entry for tensor {key!r}: {entry!r}"
                ) from None
            if dtype_name not in _DTYPES:
                raise CheckpointFormatError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype_name}")
            dtype = _DTYPES[dtype_name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {key!r} {dtype_name}{list(shape)} needs {nbytes} bytes but its offsets "
                    f"span {end - begin}: corrupt header"
                )
            if end > data_size:
                raise CheckpointFormatError(
                    f"{self.path}: file is truncated: tensor {key!r} ends at byte {self._data_start + end} "
                    f"but the file has {size} bytes"
                )
            self._entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        """Tensor ``key``, read from disk now into a new writable array ``shape(key)`` of ``dtype(key)``."""
        dtype, shape, begin, end = self._entries[key]
        out = np.empty(end - begin, np.uint8)
        view, done = memoryview(out), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            while done < len(out):  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointFormatError(
                        f"{self.path}: file is truncated: tensor {key!r} ends at byte {self._data_start + end} "
                        f"but reading stopped at byte {self._data_start + begin + done}"
                    )
                done += n
        return out.view(dtype).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._entries:
            yield key, self.get(key)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write numpy arrays (including ml_dtypes bfloat16) as a ``.safetensors`` file."""
    names = {v: k for k, v in _DTYPES.items()}
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for key, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in names:
            raise ValueError(f"cannot write dtype {arr.dtype} for {key!r}")
        header[key] = {
            "dtype": names[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
