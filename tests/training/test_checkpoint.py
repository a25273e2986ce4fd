import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from amdim.config import preset
from amdim.data.image_files import DataError
from amdim.evaluation import evaluate
from amdim.model.classifiers import Probes
from amdim.model.encoder import Encoder
from amdim.training import checkpoint
from amdim.training.checkpoint import CheckpointError

SIZES = (32, 64, 128)
TINY = dict(image_size=32, ndf=8, n_rkhs=64, n_depth=1)


def authors(reference, size):
    return reference / f"authors_format_ndf8_{size}px.pth"


def our_state(**config) -> dict:
    cfg = preset("digits", **{**TINY, **config})
    return {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "n_classes": 10,
            "encoder": Encoder(cfg.encoder).state_dict(), "probes": Probes(64, 10).state_dict(),
            "epoch": 3, "step": 60}


class Payload:
    """Unpickling this creates `marker`: a stand-in for arbitrary code in a hostile file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("size", SIZES)
def test_authors_checkpoints_reproduce_the_authors_outputs(reference, size):
    encoder, probes, state = checkpoint.load_model(authors(reference, size))
    expected = np.load(reference / f"authors_format_ndf8_{size}px_expected.npz")
    assert not encoder.training and not probes.training
    assert encoder.cfg.image_size == size and state["hyperparams"]["n_classes"] == 10
    with torch.no_grad():
        features = encoder(torch.from_numpy(expected["x"]))
        logits_mlp, logits_linear = probes(features.r1)
    outputs = {**features._asdict(), "logits_mlp": logits_mlp, "logits_linear": logits_linear}
    for name, value in outputs.items():
        torch.testing.assert_close(value, torch.from_numpy(expected[name]), rtol=1e-5,
                                   atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("size", SIZES)
def test_evaluate_accepts_authors_checkpoints(reference, tmp_path, size):
    rng = np.random.default_rng(size)
    for split, n in (("train", 5), ("val", 3)):  # 2 classes of 40 px images: dark and bright
        for c, name in enumerate(("dark", "bright")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.integers(0, 100, (40, 40, 3)) + 150 * c).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    out = tmp_path / "results.json"
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    args = parser.parse_args([
        "evaluate", str(authors(reference, size)), "--data", str(tmp_path), "--mode", "features",
        "--epochs", "2", "--workers", "0", "--device", "cpu", "--out", str(out)])
    args.func(args)
    report = json.loads(out.read_text())
    assert report["n_train"] == 10 and report["n_test"] == 6 and report["n_classes"] == 2
    assert report["epochs"] == 2 and report["knn_top1"] == 1.0


def test_authors_checkpoint_needs_data_to_evaluate(reference):
    with pytest.raises(DataError, match="does not record its data; pass --data"):
        evaluate.evaluate_checkpoint(str(authors(reference, 32)))


def test_our_checkpoint_round_trips(tmp_path):
    state = our_state(use_bn=True)
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    encoder, probes, loaded = checkpoint.load_model(tmp_path / "checkpoint.pt")
    assert not encoder.training and not probes.training and encoder.cfg.use_bn
    for name, value in state["encoder"].items():
        assert torch.equal(encoder.state_dict()[name], value), name
    assert loaded["config"] == state["config"] and loaded["step"] == 60
    assert not checkpoint.load_encoder(tmp_path / "checkpoint.pt").training


def test_truncated_checkpoint(reference, tmp_path):
    data = authors(reference, 32).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint .truncated"):
        checkpoint.load_model(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_model(tmp_path / "empty.pth")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load_model(tmp_path / "nothing.pt")


@pytest.mark.parametrize("content", [torch.zeros(3), {"weights": torch.zeros(3)}, [1, 2]])
def test_torch_file_that_is_not_a_checkpoint(tmp_path, content):
    torch.save(content, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither an amdim checkpoint nor one of the authors'"):
        checkpoint.load_model(tmp_path / "other.pt")


def test_other_format_version(tmp_path):
    torch.save({**our_state(), "format": "amdim/99"}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 'amdim/99'; this amdim reads amdim/1"):
        checkpoint.load_model(tmp_path / "future.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_arbitrary_objects_are_never_unpickled(tmp_path, writer):
    marker = tmp_path / "code-ran"
    state = {**our_state(), "extra": Payload(marker)}
    with open(tmp_path / "hostile.pt", "wb") as f:
        torch.save(state, f) if writer == "torch.save" else pickle.dump(state, f)
    with pytest.raises(CheckpointError, match="never unpickled"):
        checkpoint.load_model(tmp_path / "hostile.pt")
    assert not marker.exists()


def test_config_that_does_not_match_the_weights(tmp_path):
    state = our_state()
    state["config"]["ndf"] = 16  # the weights are ndf 8
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match the model its config describes"):
        checkpoint.load_model(tmp_path / "mismatch.pt")


def test_authors_hyperparams_that_do_not_match_the_weights(reference, tmp_path):
    state = torch.load(authors(reference, 32), weights_only=True)
    state["hyperparams"]["n_depth"] = 3  # the weights have 2 layers per block
    torch.save(state, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="does not match the model"):
        checkpoint.load_model(tmp_path / "mismatch.pth")


# -- issue 17: digests, missing fields, encoder-only files


def flip_a_tensor_byte(path, entry_index=0):
    """Flip one byte inside the data of a tensor stored in a torch.save zip file."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = [i for i in archive.infolist() if "/data/" in i.filename][entry_index]
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:
                                                            info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_tensor_are_found_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(our_state(), path)
    state = checkpoint.load(path)
    assert state["digest"] == checkpoint.digest(state)
    flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match=f"{path} is corrupt: its tensors do not match"):
        checkpoint.load_model(path)


def test_checkpoints_without_a_digest_load_as_before(tmp_path, reference):
    path = tmp_path / "old.pt"
    torch.save(our_state(), path)  # as written before digests
    assert "digest" not in checkpoint.load(path)
    checkpoint.load_model(path)
    checkpoint.load_model(authors(reference, 32))


def test_a_missing_config_field_is_named(tmp_path):
    state = our_state()
    del state["config"]["ndf"]
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"lacks the field\(s\) \['ndf'\]"):
        checkpoint.load_model(tmp_path / "checkpoint.pt")


def test_export_writes_an_encoder_only_file_that_load_encoder_reads(tmp_path, reference):
    from amdim.cli import main

    path = tmp_path / "checkpoint.pt"
    state = our_state()
    state["optimizer"] = {"state": {0: {"exp_avg": torch.randn(200_000)}}, "param_groups": []}
    checkpoint.save_atomic(state, path)
    main(["export", str(path), "--out", str(tmp_path / "shared" / "encoder.pt")])
    exported = tmp_path / "shared" / "encoder.pt"
    assert exported.stat().st_size < path.stat().st_size / 2
    saved = checkpoint.load(exported)
    assert saved["format"] == checkpoint.ENCODER_FORMAT and "optimizer" not in saved
    assert saved["digest"] == checkpoint.digest(saved)
    encoder = checkpoint.load_encoder(exported)
    for key, value in state["encoder"].items():
        assert torch.equal(encoder.state_dict()[key], value)
    main(["export", str(authors(reference, 64)), "--out", str(tmp_path / "authors.pt")])
    assert checkpoint.load_encoder(tmp_path / "authors.pt").cfg.image_size == 64
    with pytest.raises(SystemExit, match="amdim export: no checkpoint at"):
        main(["export", str(tmp_path / "missing.pt")])
