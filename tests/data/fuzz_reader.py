"""Fuzz the image reader: ``python tests/data/fuzz_reader.py N`` runs N hypothesis examples for
each of four seed files (plus N for PNGs with their CRCs repaired after the damage) and
prints a JSON line of counts. Any exception other than BadImageError fails the run; a
crash of a decoder kills this process, which the calling test sees as a signal.

Run in a child process by tests/test_hardening.py, so that a crash cannot take pytest down.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.data.images import BadImageError, decode_bytes


def _encoded(format: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


SEEDS = {
    "png": _encoded("PNG"),
    "png-palette": _encoded("PNG", "P"),
    "jpeg": _encoded("JPEG"),
    "bmp": _encoded("BMP"),
    "gif": _encoded("GIF", "P"),
}
counts = {"examples": 0, "images": 0, "refused": 0}


def repair_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every PNG chunk that still lies inside the file."""
    out, position = bytearray(data), 8
    while position + 12 <= len(out):
        length = int.from_bytes(out[position : position + 4], "big")
        end = position + 12 + length
        if end > len(out):
            break
        out[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(out[position + 4 : end - 4])))
        position = end
    return bytes(out)


def decode(data: bytes) -> None:
    counts["examples"] += 1
    try:
        image, _ = decode_bytes(data, "fuzzed")
    except BadImageError:
        counts["refused"] += 1
        return
    assert image.ndim == 3 and image.shape[0] in (1, 3)
    counts["images"] += 1


def mutations(seed: bytes):
    """Up to 8 single-byte changes, or a cut, of ``seed``."""
    edits = st.lists(
        st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )
    cut = st.integers(1, len(seed))
    return st.one_of(edits.map(lambda e: ("edit", e)), cut.map(lambda c: ("cut", c)))


def apply(seed: bytes, mutation) -> bytes:
    kind, value = mutation
    if kind == "cut":
        return seed[:value]
    data = bytearray(seed)
    for offset, byte in value:
        data[offset] = byte
    return bytes(data)


def fuzzer(seed: bytes):
    @given(mutations(seed))
    def fuzz(mutation) -> None:
        decode(apply(seed, mutation))

    return fuzz


def repeatable(examples: int) -> settings:
    """Hypothesis settings of every fuzz run (this one and fuzz_files.py's): ``examples``
    examples a search, derandomized and without a database so that a run is repeatable,
    no deadline or health check (a slow or filtered example is no failure here)."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


def main(examples: int) -> None:
    common = repeatable(examples)
    for seed in SEEDS.values():
        common(fuzzer(seed))()

    @common
    @given(mutations(SEEDS["png"]))
    def fuzz_repaired(mutation) -> None:
        decode(repair_crcs(apply(SEEDS["png"], mutation)))

    fuzz_repaired()
    print(json.dumps(counts))


if __name__ == "__main__":
    main(int(sys.argv[1]))
