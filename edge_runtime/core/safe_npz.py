"""Read an ``.npz`` that may be hostile: bounded memory, no pickles, one-line errors.

``np.load`` trusts an archive: ``zipfile`` inflates a member in one call of up to 2 GiB
before it compares the size its headers claim (a 1 MB body deflating 1 GiB of zeros cost
the server 2 GB per request, issue 20), and numpy allocates whatever shape an ``.npy``
header names before it finds the data missing. Here

* the zip's central directory is read first: at most ``max_entries`` members, only stored
  or deflated ones, none encrypted, and the sizes they claim add up to ``max_inflated`` at most;
* each member is inflated in chunks of ``CHUNK`` bytes and cut off as soon as it yields more
  than it claimed (or fewer, or a wrong CRC-32), so a false size costs one chunk, not gigabytes;
* each ``.npy`` header is checked before anything is allocated: version 1.0 (all ``np.save``
  writes for our arrays), a dtype on the allow-list (bool, integers, floats, unicode; no
  objects, records or sub-arrays), at most ``MAX_NDIM`` non-negative dimensions whose
  product times the item size is exactly the bytes the member holds.

Everything that goes wrong is an ``NpzError`` (a ``ValueError``) with one line. numpy only.
"""
from __future__ import annotations

import ast
import io
import os
import re
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

CHUNK = 64 * 1024  # bytes inflated per step
MAX_NDIM = 8
MAX_DIRECTORY_ENTRY = 1024  # bytes of central directory per entry: np.savez writes under 100
MAX_HEADER = 4096  # an .npy header np.save writes for our arrays is 128 bytes or so
DEFAULT_MAX_INFLATED = 256 * 1024 * 1024  # local files (state, heads): far above any we write
ALLOWED_KINDS = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8), "U": None}
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # a zip local file header (30 bytes)
_FAST_HEADER = re.compile(r"^\{'descr': '([<>|=]?[A-Za-z][0-9]{0,6})', 'fortran_order': (False|True), "
                          r"'shape': \(((?:\d{1,19}, ?){0,8}\d{0,19})\), \}\s*$")


class NpzError(ValueError):
    """An archive or array that is refused; the message is one line."""


class NpzArrays(dict):
    """The arrays of an archive by name, with ``files`` and ``with`` like ``np.load``'s ``NpzFile``."""

    @property
    def files(self) -> list[str]:
        return list(self)

    def __enter__(self) -> "NpzArrays":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def load(source: bytes | str | os.PathLike, *, max_entries: int = 64, max_inflated: int = DEFAULT_MAX_INFLATED) -> NpzArrays:
    """The arrays of an npz given as bytes or a path (``OSError`` for a file that cannot be read)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return read_npz(bytes(source), max_entries=max_entries, max_inflated=max_inflated)
    with open(source, "rb") as fh:
        return read_npz(fh.read(), max_entries=max_entries, max_inflated=max_inflated)


def read_npz(data: bytes, *, max_entries: int = 64, max_inflated: int = DEFAULT_MAX_INFLATED) -> NpzArrays:
    """Every ``<name>.npy`` member of ``data`` as an array under ``<name>``; ``NpzError`` for anything else."""
    _check_directory(data, max_entries)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error) as exc:
        raise NpzError(f"not an npz archive ({_line(exc)})") from None
    with zf:
        infos = zf.infolist()
    if len(infos) > max_entries:
        raise NpzError(f"npz holds {len(infos)} entries; at most {max_entries} allowed")
    if sum(i.file_size for i in infos) > max_inflated:
        raise NpzError(f"npz would inflate to more than {max_inflated} bytes")
    out = NpzArrays()
    for info in infos:
        name = info.filename
        if not name.endswith(".npy"):
            raise NpzError(f"npz entry {name[:64]!r} is not an .npy array")
        if name[:-4] in out:
            raise NpzError(f"npz entry {name[:64]!r} appears twice")
        out[name[:-4]] = read_npy(member_bytes(data, info), name)
    return out


def _check_directory(data: bytes, max_entries: int) -> None:
    """The end record's entry count and directory size, before ``zipfile`` builds an object per entry
    (it trusts the directory size, so a 4 MB body could name 90,000 entries)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0 or len(data) < end + 22:
        raise NpzError("not an npz archive (no zip end record)")
    entries, size = struct.unpack_from("<HL", data, end + 10)
    if entries > max_entries or size > max_entries * MAX_DIRECTORY_ENTRY:
        raise NpzError(f"npz directory holds {entries} entries in {size} bytes; at most {max_entries} allowed")


def member_bytes(data: bytes, info: zipfile.ZipInfo) -> memoryview:
    """One member's bytes, never more than it claims: stored ones sliced out of ``data``, deflated
    ones inflated ``CHUNK`` at a time; the CRC-32 checked either way."""
    what = f"npz entry {info.filename[:64]!r}"
    if info.flag_bits & 0x1:
        raise NpzError(f"{what} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise NpzError(f"{what} uses compression method {info.compress_type}; only stored and deflated are read")
    start = info.header_offset
    try:
        magic, *_, name_len, extra_len = _LOCAL.unpack_from(data, start)
    except struct.error:
        magic = b""
    if magic != b"PK\x03\x04":
        raise NpzError(f"{what} has no local header")
    begin = start + 30 + name_len + extra_len
    raw = memoryview(data)[begin:begin + info.compress_size]
    if len(raw) != info.compress_size:
        raise NpzError(f"{what} is truncated")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise NpzError(f"{what} is stored with two different sizes")
        out = raw
    else:
        out = memoryview(_inflate(raw, info.file_size, what))
    if zlib.crc32(out) != info.CRC:
        raise NpzError(f"{what} is corrupt (CRC-32)")
    return out


def _inflate(raw: memoryview, size: int, what: str) -> bytearray:
    """Raw deflate of exactly ``size`` bytes, in ``CHUNK`` steps; more or fewer is refused."""
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pos = 0
    try:
        while not z.eof:
            piece = z.unconsumed_tail
            if not piece:
                piece, pos = raw[pos:pos + CHUNK], pos + CHUNK
                if not piece:
                    break
            out += z.decompress(piece, CHUNK)
            if len(out) > size:
                raise NpzError(f"{what} inflates to more than the {size} bytes it claims")
    except zlib.error as exc:
        raise NpzError(f"{what} is not valid deflate data ({_line(exc)})") from None
    if len(out) != size:
        raise NpzError(f"{what} inflates to {len(out)} bytes, it claims {size}")
    return out


def read_npy(raw: memoryview | bytes, name: str = "array") -> np.ndarray:
    """One ``.npy`` (version 1.0) as a writable array, its header checked before anything is allocated."""
    what = f"npz entry {name[:64]!r}"
    raw = memoryview(raw)
    if len(raw) < 10 or bytes(raw[:6]) != b"\x93NUMPY":
        raise NpzError(f"{what} is not an .npy array")
    if bytes(raw[6:8]) != b"\x01\x00":
        raise NpzError(f"{what} is .npy version {raw[6]}.{raw[7]}; only 1.0 is read")
    hlen = int.from_bytes(raw[8:10], "little")
    if hlen > MAX_HEADER or len(raw) < 10 + hlen:
        raise NpzError(f"{what} has an .npy header of {hlen} bytes; at most {min(MAX_HEADER, len(raw) - 10)} allowed")
    header = bytes(raw[10:10 + hlen]).decode("latin1")
    dtype, fortran, shape = _parse_header(header, what)
    check_header(dtype, shape, what)
    count = 1
    for d in shape:
        count *= d
    body = len(raw) - 10 - hlen
    if count * dtype.itemsize != body:
        raise NpzError(f"{what} holds {body} data bytes; its header promises {count * dtype.itemsize}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=10 + hlen)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return np.array(arr, copy=True, order="C")


def _parse_header(header: str, what: str) -> tuple[np.dtype, bool, tuple[int, ...]]:
    """(dtype, fortran_order, shape) of an .npy header dict, read without ``eval``."""
    m = _FAST_HEADER.match(header)
    try:
        if m:
            descr, fortran = m.group(1), m.group(2) == "True"
            shape = tuple(int(x) for x in m.group(3).replace(" ", "").split(",") if x)
        else:
            d = ast.literal_eval(header)
            if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
                raise NpzError(f"{what} has an .npy header without exactly descr, fortran_order and shape")
            descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
            if not isinstance(descr, str) or not isinstance(fortran, bool) or not isinstance(shape, tuple) \
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in shape):
                raise NpzError(f"{what} has an .npy header with a structured dtype or a malformed shape")
        dtype = np.dtype(descr)
    except NpzError:
        raise
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError) as exc:
        raise NpzError(f"{what} has an unreadable .npy header ({_line(exc)})") from None
    return dtype, fortran, shape


def check_header(dtype: np.dtype, shape: tuple[int, ...], what: str = "array") -> None:
    """The allow-list: plain bool/int/float/unicode items, at most ``MAX_NDIM`` non-negative dimensions."""
    if dtype.hasobject:
        raise NpzError(f"{what} holds Python objects; pickles are never read")
    sizes = ALLOWED_KINDS.get(dtype.kind, ())
    if dtype.fields is not None or dtype.subdtype is not None or sizes == () or (sizes and dtype.itemsize not in sizes) \
            or dtype.itemsize == 0:
        raise NpzError(f"{what} has dtype {str(dtype)[:40]}; only bool, integers, floats and unicode are read")
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise NpzError(f"{what} has shape {str(shape)[:80]}; at most {MAX_NDIM} non-negative dimensions")


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


