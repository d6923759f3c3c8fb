"""Generated hostile request bodies for the sync server's npz endpoints (issue 20): zip bombs
with true and false sizes, every ``.npy`` header field bent, huge and negative numbers, unicode,
broken zips. ``corpus(seed, n)`` is deterministic; the fuzz test and ``bench/bench_hostile.py`` share it."""
from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from typing import Iterator

import numpy as np

GOOD_META = {"format": "infantino-update/1", "device": "cam1", "base_head_version": 1, "base_package_version": "tiny-1",
             "n_samples": 3, "kind": "delta", "idempotency_key": "fuzz-0000-key", "metrics": {"labels": 3}}


def npy(descr: str, shape: str, data: bytes = b"", fortran: str = "False", version: bytes = b"\x01\x00") -> bytes:
    header = "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape)
    header = header.ljust(((len(header) + 11) // 64 + 1) * 64 - 11) + "\n"
    width = 2 if version[0] == 1 else 4
    return b"\x93NUMPY" + version + len(header).to_bytes(width, "little") + header.encode("latin1") + data


def npy_of(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def meta_npy(meta: object) -> bytes:
    return npy_of(np.asarray(json.dumps(meta) if not isinstance(meta, str) else meta))


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def lie_about_sizes(body: bytes, size: int) -> bytes:
    """Every header of the archive claims ``size`` as the uncompressed size (local and central)."""
    data = bytearray(body)
    pos = 0
    while (pos := data.find(b"PK\x03\x04", pos)) >= 0:
        struct.pack_into("<L", data, pos + 22, size)
        pos += 4
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        struct.pack_into("<L", data, pos + 24, size)
        pos += 4
    return bytes(data)


def bomb(inflated: int, claimed: int | None, name: str = "meta.npy") -> bytes:
    """A deflated member of ``inflated`` zero bytes; ``claimed`` overrides the sizes its headers state."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib, rest = divmod(inflated, 1 << 20)
    chunk = b"\0" * (1 << 20)
    first = z.compress(chunk) + z.flush(zlib.Z_FULL_FLUSH) if mib else b""
    again = z.compress(chunk) + z.flush(zlib.Z_FULL_FLUSH) if mib > 1 else b""  # a full flush: each MiB compresses the same
    raw = first + again * max(0, mib - 1) + z.compress(b"\0" * rest) + z.flush()
    crc = zlib.crc32(b"\0" * rest, _zero_crc(mib))
    size = inflated if claimed is None else claimed
    fname = name.encode()
    local = struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 8, 0, 0, crc, len(raw), size, len(fname), 0) + fname
    central = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, 0, 8, 0, 0, crc, len(raw), size, len(fname), 0, 0, 0, 0,
                          0, 0) + fname
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(raw), 0)
    return local + raw + central + end


def _zero_crc(mib: int) -> int:
    crc, chunk = 0, b"\0" * (1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    return crc


HEADER_CASES = [
    ("'f3'", "(4,)"), ("'Z1'", "(4,)"), ("'q9'", "(4,)"), ("'<f0'", "(4,)"), ("'c7'", "(4,)"), ("'V99999999999'", "(1,)"),
    ("'|O'", "(1,)"), ("'<M8[s]'", "(1,)"), ("'<m8'", "(1,)"), ("[('a', '<f4')]", "(1,)"), ("'<f4'", "(10**23,)"),
    ("'<f4'", "(100000000000000000000000,)"), ("'<f4'", "(-4,)"), ("'<f4'", "(4, -1)"), ("'<f4'", "(2**62, 2**62)"),
    ("'<f4'", "(1, 1, 1, 1, 1, 1, 1, 1, 1, 1)"), ("'<f4'", "('a',)"), ("'<f4'", "(4.0,)"), ("'<f4'", "None"),
    ("'<U2000000000'", "()"), ("'<U0'", "()"), ("'>f8'", "(3,)"), ("'<f4'", "(((((((((((((((1,),),),),),),),),),),),),),)"),
    ("'\\u00e9'", "(1,)"), ("'<f4' if 1 else 0", "(1,)"), ("__import__('os')", "(1,)"), ("'<f4'", "(True,)"),
]


def header_bodies() -> Iterator[tuple[str, bytes]]:
    meta = meta_npy(GOOD_META)
    for descr, shape in HEADER_CASES:
        for fortran in ("False", "True"):
            yield f"header {descr} {shape} fortran={fortran}", zip_of({"meta.npy": meta, "coef_0.npy": npy(descr, shape, b"\0" * 16, fortran)})
    yield "version 2 header, shape 10^12", zip_of({"meta.npy": meta, "coef_0.npy": npy("'<f4'", "(10**12,)", b"", version=b"\x02\x00")})
    yield "version 2 header, fortran 10^10", zip_of({"meta.npy": meta, "coef_0.npy": npy("'<f4'", "(10000000000,)", b"", "True", b"\x02\x00")})
    yield "version 3 header", zip_of({"meta.npy": meta, "coef_0.npy": npy("'<f4'", "(1,)", b"\0" * 4, version=b"\x03\x00")})
    yield "header length beyond data", zip_of({"meta.npy": b"\x93NUMPY\x01\x00\xff\xff{'descr'"})
    yield "deep header", zip_of({"meta.npy": npy("'<f4'", "(" * 3000 + ")" * 3000, b"")})
    yield "meta as a float array", zip_of({"meta.npy": npy_of(np.zeros(3, np.float32))})


def meta_bodies(rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    values = [10 ** 5000, -(10 ** 5000), 2 ** 63, -1, -(2 ** 31), 1e308 * 10, float("nan"), "\ud800", "é" * 300, "\x00",
              [], {}, None, True, "1" * 5000, "../../etc/passwd", {"a": {"b": {"c": 1}}}]
    for key in ("base_head_version", "n_samples", "device", "idempotency_key", "base_package_version", "kind", "format",
                "metrics", "package_version", "classes"):
        for v in values:
            meta = {**GOOD_META, key: v}
            try:
                text = json.dumps(meta, allow_nan=True)
            except (ValueError, OverflowError):
                continue
            yield f"meta.{key}={str(v)[:20]!r}", zip_of({"meta.npy": meta_npy(text), "coef_0.npy": npy_of(np.zeros(2, np.float32))})
    for name in ("\ud800", "a=b", "%", '"', "x" * 65, "", " ", "a/b", "..", "ünï", "a\nb"):
        yield f"metric name {name[:8]!r}", zip_of({"meta.npy": meta_npy(json.dumps({**GOOD_META, "metrics": {name: 1}})),
                                                    "coef_0.npy": npy_of(np.zeros(2, np.float32))})
    deep = "[" * 100000 + "]" * 100000
    yield "meta nested 100000 deep", zip_of({"meta.npy": meta_npy(deep)})
    yield "meta not json", zip_of({"meta.npy": meta_npy("{not json")})
    yield "meta with a 5000-digit integer", zip_of({"meta.npy": meta_npy('{"n_samples": ' + "9" * 5000 + "}")})
    for i in range(8):
        garbage = rng.bytes(int(rng.integers(1, 4096)))
        yield f"random bytes {i}", garbage
        yield f"random member {i}", zip_of({"meta.npy": garbage})


def zip_bodies() -> Iterator[tuple[str, bytes]]:
    meta = meta_npy(GOOD_META)
    honest = zip_of({"meta.npy": meta, "coef_0.npy": npy_of(np.ones((64, 64), np.float32))}, zipfile.ZIP_DEFLATED)
    yield "bomb 1 GiB claiming 1000 bytes", bomb(1 << 30, 1000)
    yield "bomb 256 MiB claiming 1000 bytes (coef)", bomb(256 << 20, 1000, "coef_0.npy")
    yield "bomb 64 MiB, true size", bomb(64 << 20, None)
    yield "bomb 8 MiB claiming 0", bomb(8 << 20, 0)
    yield "bomb 2 MiB claiming 2**32-1", bomb(2 << 20, 2 ** 32 - 1)
    yield "deflated honest sizes", honest
    for size in (0, 1, 1000, 2 ** 31, 2 ** 32 - 1):
        yield f"deflated, sizes say {size}", lie_about_sizes(honest, size)
    stored = zip_of({"meta.npy": meta, "coef_0.npy": npy_of(np.ones(16, np.float32))})
    yield "stored, sizes say 2**32-1", lie_about_sizes(stored, 2 ** 32 - 1)
    yield "truncated zip", stored[: len(stored) // 2]
    yield "zip without end record", stored[:-22]
    yield "bzip2 member", zip_of({"meta.npy": meta}, zipfile.ZIP_BZIP2)
    yield "lzma member", zip_of({"meta.npy": meta}, zipfile.ZIP_LZMA)
    yield "many members", zip_of({f"m{i}.npy": b"" for i in range(2000)})
    yield "end record cut off", zip_of({"meta.npy": meta})[:-22]
    yield "not npy members", zip_of({"meta.txt": b"hello", "meta.npy": meta})
    yield "empty zip", zip_of({})
    yield "directory of 90,000 claimed entries", stored[:-22] + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 65535, 65535,
                                                                          4_000_000, 0, 0)
    crc_bad = bytearray(stored)
    crc_bad[60] ^= 0xFF
    yield "flipped byte in a stored member", bytes(crc_bad)


def corpus(seed: int = 0, repeat: int = 1) -> list[tuple[str, bytes]]:
    """Every generated body (``repeat`` rounds of the random ones)."""
    rng = np.random.default_rng(seed)
    out = list(zip_bodies()) + list(header_bodies())
    for _ in range(repeat):
        out += list(meta_bodies(rng))
    return out
