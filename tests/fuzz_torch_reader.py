"""Property: any legacy file loads exactly its in-bounds values or is refused with WeightsError.

Run by ``test_torch_reader.py`` in a subprocess, so that a crash of the reader (a segfault from
an unchecked view) fails that test instead of killing the test session.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_files import LegacyFile, Storage, Tensor

from captioner.encoders.torch_weights import load_state_dict
from captioner.errors import WeightsError

HUGE = st.sampled_from([10**9, 2**31, 2**62, 10**15])
SMALL = st.integers(-3, 40)
NUMBER = st.one_of(SMALL, SMALL, SMALL, HUGE, HUGE.map(lambda v: -v))


@st.composite
def legacy_files(draw):
    n = draw(st.integers(0, 32))
    values = np.arange(1, n + 1, dtype=np.float32)
    declared = draw(st.one_of(st.none(), st.none(), st.integers(-2, 40), HUGE))
    dims = draw(st.integers(0, 3))
    shape = tuple(draw(NUMBER) for _ in range(dims))
    stride = tuple(draw(NUMBER) for _ in range(draw(st.sampled_from([dims, dims, dims + 1]))))
    offset = draw(NUMBER)
    truncate = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 24)))
    storage = Storage("0", values, declared)
    return LegacyFile({"w": Tensor(storage, offset, shape, stride)}), truncate


def expected(file: LegacyFile) -> np.ndarray | None:
    """The tensor a correct reader returns, or None where the file must be refused."""
    t = file.tensors["w"]
    n, numel = len(t.storage.values), t.storage.numel
    if numel < 0 or numel > n or len(t.shape) != len(t.stride) or t.offset < 0:
        return None
    if min(t.shape + t.stride, default=0) < 0 or math.prod(t.shape) > numel:
        return None
    if math.prod(t.shape) == 0:
        return np.empty(t.shape, np.float32)
    index = np.full(t.shape, t.offset, dtype=object)  # element index of every position
    for axis, (dim, step) in enumerate(zip(t.shape, t.stride, strict=True)):
        index = index + (np.arange(dim, dtype=object) * step).reshape(
            (-1,) + (1,) * (len(t.shape) - axis - 1))
    if int(index.max()) >= numel:
        return None
    return t.storage.values[index.astype(np.int64)]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(legacy_files())
def reader_is_bounded(case) -> None:
    file, truncate = case
    want = expected(file)
    with tempfile.TemporaryDirectory() as tmp:
        path = file.write(Path(tmp) / "w.pth", truncate=truncate)
        try:
            got = load_state_dict(path)["w"]
        except WeightsError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            assert want is None or truncate, f"a valid file was refused: {exc}"
            return
    assert want is not None, "an out-of-bounds view was loaded"
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


if __name__ == "__main__":
    reader_is_bounded()
    print("fuzz: ok")
    sys.exit(0)
