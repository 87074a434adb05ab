"""The lab decoder: the NumPy forward through qkv ops equals its torch twin; weights I/O; the
shipped model retrieves passkeys (>= 95% at every training length and depth, NumPy forward)."""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import tasks

torch = pytest.importorskip("torch")
from qkv.lab import train  # noqa: E402  (needs torch)

SMALL = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, max_len=96)


def test_numpy_forward_equals_torch_twin():
    w = dec.init_weights(dec.DecoderConfig(), seed=1)
    tok = tasks.training_batch(3, 70, np.random.default_rng(0))[0]
    got = dec.forward(w, tok)
    want = train.to_torch(w)(torch.from_numpy(tok)).detach().numpy()
    assert got.dtype == np.float32 and got.shape == (3, 70, 128)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torch_round_trip_is_exact():
    w = dec.init_weights(SMALL, seed=2)
    back = train.from_torch(train.to_torch(w))
    for (name, a), b in zip(w.to_arrays().items(), back.to_arrays().values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_forward_is_causal_and_float64_follows():
    w = dec.init_weights(SMALL, seed=3)
    tok = np.random.default_rng(0).integers(0, 64, size=(1, 30))
    a = dec.forward(w, tok)
    tok2 = tok.copy()
    tok2[0, 20:] = (tok2[0, 20:] + 1) % 64
    np.testing.assert_array_equal(dec.forward(w, tok2)[0, :20], a[0, :20])
    w64 = w.astype(np.float64)
    b = dec.forward(w64, tok)
    assert b.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_swapping_attention_per_layer_and_head():
    w = dec.init_weights(SMALL, seed=4)
    tok = np.random.default_rng(1).integers(0, 64, size=(2, 25))
    base = dec.forward(w, tok)
    same = dec.forward(w, tok, attention=dec.replace_heads({}, lambda *a: None))
    np.testing.assert_array_equal(same, base)
    calls = []

    def uniform(layer, q, k, v):  # a different attention: mean of visible values
        calls.append(layer)
        n = q.shape[2]
        return qkv.sdpa(np.zeros_like(q), k, v, causal=True) + 0 * n

    swapped = dec.forward(w, tok, attention={1: dec.replace_heads({1: {0, 5}}, uniform)})
    assert calls == [1]
    assert not np.allclose(swapped, base)
    # the replaced heads' output really is the uniform average (checked on layer 0 alone)
    one = dec.DecoderConfig(n_layers=1, d_model=64, d_ff=96, max_len=96)
    w1 = dec.init_weights(one, seed=5)
    x = w1.embed[tok]
    q, k, v = dec.project_qkv(one, w1.layers[0], x, 0)
    mixed = dec.replace_heads({0: (2,)}, uniform)(0, q, k, v)
    counts = np.arange(1, 26)[:, None]
    mean_v = np.cumsum(v[:, 2 // 4], axis=1) / counts  # head 2 reads KV head 0
    np.testing.assert_allclose(mixed[:, 2], mean_v, rtol=1e-5, atol=1e-6)


def test_return_attention_rows_sum_to_one():
    w = dec.init_weights(SMALL, seed=6)
    logits, maps = dec.forward(w, np.arange(20) % 64, return_attention=True)
    assert maps.shape == (2, 1, 8, 20, 20)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps[0, 0, 0], 1) == 0)


def test_save_load_round_trip(tmp_path):
    w = dec.init_weights(SMALL, seed=7)
    path = dec.save(w, tmp_path / "m.npz", note="x")
    back = dec.load(path)
    assert back.config == SMALL
    np.testing.assert_array_equal(back.embed, w.embed.astype(np.float16).astype(np.float32))
    assert dec.load_header(path)["note"] == "x"


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*qkv lab train-decoder"):
        dec.load(tmp_path / "nope.npz")


def test_wrong_shape_weights_name_the_array_and_the_command(tmp_path):
    w = dec.init_weights(SMALL, seed=8)
    arrays = {k: v.astype(np.float16) for k, v in w.to_arrays().items()}
    arrays["layers.1.wk"] = arrays["layers.1.wk"][:, :8]
    import json

    header = json.dumps({"config": SMALL.__dict__})
    np.savez(tmp_path / "bad.npz", config=np.array(header), **arrays)
    with pytest.raises(ShapeError, match=r"bad\.npz: layers\.1\.wk: expected shape.*train-decoder"):
        dec.load(tmp_path / "bad.npz")


def test_prompt_longer_than_the_position_range_is_refused():
    w = dec.init_weights(SMALL, seed=9)
    with pytest.raises(ParameterError, match=r"max_len=96.*got 97"):
        dec.forward(w, np.zeros(97, dtype=int))
    with pytest.raises(ParameterError, match=r"tokens: expected ids in \[0, 128\)"):
        dec.forward(w, np.array([1, 128]))
    with pytest.raises(ShapeError, match="tokens"):
        dec.forward(w, np.zeros((1, 2, 3), dtype=int))


def test_bad_config():
    with pytest.raises(ParameterError, match="n_kv_heads"):
        dec.DecoderConfig(n_kv_heads=3)
    with pytest.raises(ParameterError, match="d_model"):
        dec.DecoderConfig(d_model=100)


@pytest.mark.skipif(not dec.DEFAULT_PATH.is_file(), reason="no shipped weights yet")
def test_shipped_model_retrieves_passkeys_at_every_length_and_depth():
    """Held-out (seed 99, not the training stream), NumPy forward through qkv ops."""
    w = dec.load()
    acc = train.passkey_accuracy(
        w, lengths=(64, 128, 256, 512), depths=(0.0, 0.25, 0.5, 0.75, 1.0), per_cell=4, seed=99
    )
    table = np.array(acc["accuracy"])
    assert table.min() >= 0.95, table


def test_train_decoder_command_writes_weights_curve_and_accuracy(tmp_path):
    """A few steps of ``qkv lab train-decoder``: the files it promises exist and load back."""
    from typer.testing import CliRunner

    from qkv.cli import app

    out = tmp_path / "tiny.npz"
    result = CliRunner().invoke(
        app, ["lab", "train-decoder", "--steps", "3", "--out", str(out)], terminal_width=150
    )
    assert result.exit_code == 0, result.output
    weights = dec.load(out)
    assert weights.config == dec.DecoderConfig()
    assert (tmp_path / "tiny_loss.json").stat().st_size > 0
    assert (tmp_path / "tiny_loss.png").stat().st_size > 0
    header = dec.load_header(out)
    assert header["steps"] == 3 and "passkey" in header
