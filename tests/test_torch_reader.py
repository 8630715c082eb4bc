"""The restricted torch reader on files from strangers: every view is bounded, every refusal is
one line; the genuine EfficientNet-Lite files load exactly as before."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch_files import LegacyFile, Storage, Tensor, one_tensor

from captioner.cli import main
from captioner.encoders.efficientnet import VARIANTS, load_torch_weights
from captioner.encoders.torch_weights import load_state_dict
from captioner.errors import WeightsError

TESTS = Path(__file__).parent

# (case, file, what the one-line refusal says)
BAD = {
    "shape past the storage (segfaulted)": (one_tensor(range(4), shape=(50_000_000,)), "elements"),
    "huge stride (segfaulted)": (one_tensor(range(4), shape=(4,), stride=(10**9,)), "reaches"),
    "two elements too many": (one_tensor(range(4), shape=(6,)), "only 4"),
    "negative stride": (one_tensor(range(4), offset=3, shape=(4,), stride=(-1,)), "negative"),
    "offset past the end": (one_tensor(range(4), offset=5, shape=(1,)), "reaches element 5"),
    "offset moved 10 on": (one_tensor(range(40), offset=10, shape=(40,)), "element 49 of a 40"),
    "storage claims 10**15 elements": (one_tensor(range(4), declared=10**15), "could hold"),
    "negative dimension": (one_tensor(range(4), shape=(-1, 2), stride=(2, 1)), "negative"),
    "negative offset": (one_tensor(range(4), offset=-1, shape=(1,)), "offset -1"),
    "shape and strides of different lengths": (one_tensor(range(4), stride=(1, 1)), "pair up"),
    "float dimension": (one_tensor(range(4), shape=(2.0,)), "non-integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_crafted_views_are_refused_naming_file_and_tensor(tmp_path, case):
    file, says = BAD[case]
    path = file.write(tmp_path / "crafted.pth")
    with pytest.raises(WeightsError, match=says) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    if "could hold" not in says:  # refused once the tensor is known: it is named
        assert "tensor 'w'" in message


def test_in_bounds_views_load_exactly(tmp_path):
    storage = Storage("0", np.arange(12, dtype=np.float32))
    file = LegacyFile({
        "transposed": Tensor(storage, 0, (3, 4), (1, 3)),  # a (4, 3) block read column-wise
        "tail": Tensor(storage, 10, (2,), (1,)),
        "scalar": Tensor(storage, 11, (), ()),
        "empty": Tensor(storage, 12, (0,), (1,)),
        "last_element_via_stride": Tensor(storage, 1, (2,), (10,)),
        "size_one_dim_any_stride": Tensor(storage, 3, (1, 2), (2**62, 1)),
    })
    state = load_state_dict(file.write(tmp_path / "ok.pth"))
    values = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(state["transposed"], values.reshape(4, 3).T)
    np.testing.assert_array_equal(state["tail"], [10, 11])
    assert state["scalar"].shape == () and state["scalar"] == 11
    assert state["empty"].shape == (0,)
    np.testing.assert_array_equal(state["last_element_via_stride"], [1, 11])
    np.testing.assert_array_equal(state["size_one_dim_any_stride"], [[3, 4]])
    assert all(a.flags.c_contiguous and a.flags.owndata for a in state.values())


@pytest.mark.parametrize("truncate", [1, 8, 20])
def test_truncated_files_are_refused(tmp_path, truncate):
    path = one_tensor(range(4)).write(tmp_path / "cut.pth", truncate=truncate)
    with pytest.raises(WeightsError, match="cut.pth"):
        load_state_dict(path)


def test_storage_size_field_must_match_its_declaration(tmp_path):
    file = one_tensor(range(4))
    file.size_field["0"] = 3
    with pytest.raises(WeightsError, match="holds 3 elements but was declared with 4"):
        load_state_dict(file.write(tmp_path / "sizes.pth"))


@pytest.mark.subprocess
@pytest.mark.hypothesis
def test_the_fuzzed_reader_never_crashes_and_never_reads_out_of_bounds():
    """Hypothesis-generated files (offsets, shapes, strides, counts, truncations), in a
    subprocess: a segfault fails this test instead of killing the test session."""
    proc = subprocess.run([sys.executable, str(TESTS / "fuzz_torch_reader.py")], cwd=TESTS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fuzz: ok" in proc.stdout


@pytest.mark.parametrize("case", list(BAD))
def test_encoder_summary_refuses_a_crafted_file_in_one_line(tmp_path, capsys, case):
    path = BAD[case][0].write(tmp_path / "crafted.pth")
    assert main(["encoder", "summary", "efficientnet_lite2", "--weights", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crafted.pth" in err[0] and "Traceback" not in err[0]


def _tiny_head():
    import keras

    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs))


@pytest.mark.parametrize(("weight", "says"), [
    (np.arange(8, dtype="<i8").reshape(2, 4), "floating-point"),
    (np.array([[np.nan] * 4, [0.0] * 4], np.float32), "NaN"),
])
def test_weights_must_be_finite_floats(tmp_path, weight, says):
    file = LegacyFile({
        "_fc.weight": Tensor(Storage("0", weight.ravel()), 0, (2, 4), (4, 1)),
        "_fc.bias": Tensor(Storage("1", np.zeros(2, np.float32)), 0, (2,), (1,)),
    })
    with pytest.raises(WeightsError, match=f"layer 'fc'.*{says}"):
        load_torch_weights(_tiny_head(), file.write(tmp_path / "head.pth"))


# sha256 over (name, dtype, shape, bytes) of every tensor, as the reader before the bounds
# checks returned them: the genuine files must load bit-identically
GENUINE = {
    "efficientnet_lite0": "5cee0688c863bfaea225be8d8751a0a6855605e3881d832cd249c034bd24b260",
    "efficientnet_lite1": "5de92b280517548d2d5fe8f2cb60b8049f178efe9b17116f2de9746ef5b7e93d",
    "efficientnet_lite2": "3a6461f82a5bea05c30097354dca9282b23fda2d1ce99fdf6df2800a1ad8e2f0",
}


@pytest.mark.parametrize("name", list(GENUINE))
def test_genuine_files_load_bit_identically(name):
    if importlib.util.find_spec(VARIANTS[name].package) is None:
        pytest.skip(f"{VARIANTS[name].package} is not installed")
    state = load_state_dict(VARIANTS[name].weights_path())
    digest = hashlib.sha256()
    for key in sorted(state):
        a = state[key]
        for part in (key, str(a.dtype), str(a.shape)):
            digest.update(part.encode())
        digest.update(a.tobytes())
    assert digest.hexdigest() == GENUINE[name]
