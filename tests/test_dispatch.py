"""Backend selection, array types in and out, fallback and strict mode."""

from __future__ import annotations

import sys
import textwrap
import types
import warnings

import numpy as np
import pytest

import qkv
from qkv import _dispatch
from qkv.errors import Unsupported
from qkv.reference import core

TOY_BACKEND = """
import numpy as np
from qkv.reference import core

NAME = "{name}"
calls = []

def available():
    return True, "always"

def asarray(x):
    return np.asarray(x)

def to_numpy(x):
    return np.asarray(x)

def sdpa(q, k, v, **kwargs):
    calls.append("sdpa")
    return core.sdpa(q, k, v, **kwargs)
"""


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("QKV_BACKEND", raising=False)
    monkeypatch.delenv("QKV_STRICT", raising=False)
    _dispatch.reset_warnings()
    yield
    _dispatch.reset_warnings()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A third-party backend importable as ``toy_qkv_backend`` and registered as entry point."""
    (tmp_path / "toy_qkv_backend.py").write_text(TOY_BACKEND.format(name="toy"))
    dist = tmp_path / "toy_qkv_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-qkv-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qkv.backends]\ntoy = toy_qkv_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_qkv_backend", None)
    yield
    sys.modules.pop("toy_qkv_backend", None)


def arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((1, 2, 5, 4)).astype(dtype),
        rng.standard_normal((1, 1, 6, 4)).astype(dtype),
        rng.standard_normal((1, 1, 6, 4)).astype(dtype),
    )


def test_default_backend_is_the_reference():
    assert qkv.current_backend() == "reference"


def test_environment_context_and_call_are_applied_in_order(monkeypatch, toy):
    q, k, v = arrays()
    monkeypatch.setenv("QKV_BACKEND", "toy")
    assert qkv.current_backend() == "toy"
    toy_module = sys.modules["toy_qkv_backend"]
    qkv.sdpa(q, k, v)
    assert toy_module.calls == ["sdpa"]
    with qkv.use_backend("reference"):
        assert qkv.current_backend() == "reference"
        qkv.sdpa(q, k, v)
        assert toy_module.calls == ["sdpa"]
        qkv.sdpa(q, k, v, backend="toy")  # per call beats the context
        assert toy_module.calls == ["sdpa", "sdpa"]
    assert qkv.current_backend() == "toy"


def test_a_backend_by_dotted_module_path(toy):
    q, k, v = arrays()
    out = qkv.sdpa(q, k, v, backend="toy_qkv_backend")
    np.testing.assert_allclose(out, core.sdpa(q, k, v))
    assert sys.modules["toy_qkv_backend"].calls == ["sdpa"]


def test_a_backend_by_entry_point(toy):
    assert "toy" in qkv.known_backends()
    q, k, v = arrays()
    qkv.sdpa(q, k, v, backend="toy")
    assert sys.modules["toy_qkv_backend"].calls == ["sdpa"]


def test_unknown_names_fail_at_once_listing_the_known_ones(monkeypatch):
    with pytest.raises(qkv.UnknownBackend, match="known names: reference, numba, torch, cupy"):
        with qkv.use_backend("numpyy"):
            pass
    monkeypatch.setenv("QKV_BACKEND", "fast")
    with pytest.raises(qkv.UnknownBackend, match="'fast'"):
        qkv.sdpa(*arrays())
    with pytest.raises(qkv.UnknownBackend, match="not an importable module"):
        qkv.sdpa(*arrays(), backend="no_such_package.backend")


def test_a_module_that_is_not_a_backend_is_refused():
    with pytest.raises(qkv.UnknownBackend, match="lacks NAME, available"):
        qkv.sdpa(*arrays(), backend="json")


def test_unavailable_backend_names_the_reason():
    module = types.ModuleType("broken_backend")
    module.NAME = "broken"
    module.available = lambda: (False, "libfoo is missing; fix: pip install foo")
    module.asarray = module.to_numpy = np.asarray
    with pytest.raises(qkv.BackendUnavailable, match="libfoo is missing; fix: pip install foo"):
        qkv.sdpa(*arrays(), backend=module)


def test_cupy_without_a_gpu_is_unavailable_with_a_fix():
    ok, _ = _dispatch.availability(_dispatch.load("cupy"))
    if ok:
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(qkv.BackendUnavailable, match=r"cupy.*fix"):
        qkv.sdpa(*arrays(), backend="cupy")
    with pytest.raises(qkv.BackendUnavailable):
        with qkv.use_backend("cupy"):
            pass


def _module(name, **ops):
    module = types.ModuleType(name)
    module.NAME = name
    module.available = lambda: (True, "")
    module.asarray = module.to_numpy = np.asarray
    for op_name, fn in ops.items():
        setattr(module, op_name, fn)
    return module


def test_missing_op_falls_back_with_one_warning_per_backend_and_op():
    q, k, v = arrays()
    empty = _module("empty_backend")
    with pytest.warns(qkv.FallbackWarning, match="'empty_backend' does not implement op 'sdpa'"):
        out = qkv.sdpa(q, k, v, backend=empty)
    np.testing.assert_allclose(out, core.sdpa(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qkv.sdpa(q, k, v, backend=empty)  # the same pair again: silent
    with pytest.warns(qkv.FallbackWarning, match="'flash'"):
        qkv.flash(q, k, v, backend=empty)


def test_strict_mode_turns_fallback_into_an_error(monkeypatch):
    monkeypatch.setenv("QKV_STRICT", "1")
    with pytest.raises(qkv.MissingOp, match="QKV_STRICT=1"):
        qkv.sdpa(*arrays(), backend=_module("empty_backend"))


def test_unsupported_inputs_fall_back_with_the_reason():
    def picky_sdpa(q, k, v, **kwargs):
        raise Unsupported("float32 only on Tuesdays")

    picky = _module("picky", sdpa=picky_sdpa)
    q, k, v = arrays()
    with pytest.warns(qkv.FallbackWarning, match="Tuesdays"):
        out = qkv.sdpa(q, k, v, backend=picky)
    np.testing.assert_allclose(out, core.sdpa(q, k, v))


def test_inputs_are_checked_before_any_backend_runs():
    ran = []
    spy = _module("spy", sdpa=lambda *a, **kw: ran.append(1))
    q, k, v = arrays()
    with pytest.raises(qkv.ShapeError):
        qkv.sdpa(q, k[:, :, :3], v, backend=spy)
    assert ran == []


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    q, k, v = arrays()
    out = qkv.sdpa(q, k, v, backend="torch")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    for name in ("reference", "numba", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qkv.FallbackWarning)
            result = qkv.sdpa(tq, tk, tv, causal=True, return_lse=True, backend=name)
        assert all(isinstance(r, torch.Tensor) for r in result), name
        assert result[0].dtype == torch.float32, name
        np.testing.assert_allclose(
            result[0].numpy(), core.sdpa(q, k, v, causal=True), rtol=1e-5, atol=1e-6
        )


def test_public_ops_keep_the_reference_signature_and_docs():
    import inspect

    params = inspect.signature(qkv.sdpa).parameters
    assert list(params)[:3] == ["q", "k", "v"] and "backend" in params
    assert params["causal"].kind is inspect.Parameter.KEYWORD_ONLY
    assert qkv.sdpa.__doc__ == core.sdpa.__doc__


def test_a_toy_backend_in_a_subprocess_via_environment(tmp_path):
    import subprocess

    (tmp_path / "env_backend.py").write_text(TOY_BACKEND.format(name="env_backend"))
    script = textwrap.dedent(
        """
        import numpy as np, qkv, env_backend
        x = np.ones((1, 1, 2, 4), np.float32)
        qkv.sdpa(x, x, x)
        print(qkv.current_backend(), env_backend.calls)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"QKV_BACKEND": "env_backend", "PYTHONPATH": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["env_backend", "['sdpa']"]


def test_keyword_arrays_reach_the_backend_in_its_array_type():
    seen = {}

    def recording_sdpa(q, k, v, *, mask=None, **kwargs):
        seen["q"], seen["mask"] = type(q), type(mask)
        return q

    def tag(x):
        return np.asarray(x).view(TaggedArray)

    class TaggedArray(np.ndarray):
        pass

    module = _module("tagging", sdpa=recording_sdpa)
    module.asarray = tag
    q, k, v = arrays()
    qkv.sdpa(q, k, v, mask=np.ones((5, 6), bool), backend=module)
    assert seen == {"q": TaggedArray, "mask": TaggedArray}
