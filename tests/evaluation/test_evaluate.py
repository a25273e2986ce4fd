import argparse
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from amdim.config import EncoderConfig, preset
from amdim.data.datasets import STATS, ArrayImages, digits, labelled_split
from amdim.data.image_files import DataError
from amdim.evaluation import (classifier_training as evaluate, evaluate as evaluate_command,
                              extract, plots)
from amdim.evaluation.classifier_training import EvaluationConfig, EvaluationError
from amdim.model.classifiers import Probes
from amdim.model.encoder import Encoder
from amdim.training import checkpoint
from amdim.views.image_views import augmentation, evaluation_transform

TINY = dict(image_size=32, ndf=8, n_rkhs=64, n_depth=1)


def run_cli(*argv) -> None:
    """`amdim COMMAND ...` with this suite's commands registered as cli.py registers them."""
    parser = argparse.ArgumentParser(prog="amdim")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (evaluate_command, extract, plots):
        module.register(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


def image_folder(root, size=32, n_train=6, n_test=3, classes=("cat", "dog")):
    """root/train/<class>/*.png and root/val/<class>/*.png; classes differ in brightness."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_test)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 100, (size, size, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def our_checkpoint(path, data="digits", use_bn=False, n_classes=2):
    cfg = preset("digits", data=str(data), use_bn=use_bn, **TINY)
    encoder = Encoder(cfg.encoder)
    state = {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "n_classes": n_classes,
             "encoder": encoder.state_dict(), "probes": Probes(64, n_classes).state_dict(),
             "epoch": 1, "step": 10}
    checkpoint.save_atomic(state, path)
    return path


def bn_encoder() -> Encoder:
    """A tiny encoder with batch norm whose running statistics are not the defaults."""
    encoder = Encoder(EncoderConfig(use_bn=True, **TINY))
    with torch.no_grad():
        encoder.train()(torch.randn(16, 3, 32, 32))
    return encoder.eval()


@pytest.fixture(scope="module")
def tiny_digits():
    """(train, test, augmented train) of 120 / 60 digits."""
    stats = STATS["digits"]
    (x_train, y_train), (x_test, y_test) = digits("train"), digits("test")
    plain = evaluation_transform(32, *stats)
    augmented = T.Compose([T.RandomHorizontalFlip(), augmentation(32, *stats)])
    return (ArrayImages(x_train[:120], y_train[:120], plain),
            ArrayImages(x_test[:60], y_test[:60], plain),
            ArrayImages(x_train[:120], y_train[:120], augmented))


def snapshot(encoder):
    return {k: v.clone() for k, v in encoder.state_dict().items()}


@pytest.mark.parametrize("data_path", ["loader", "device"])
@pytest.mark.parametrize("mode", ["features", "full"])
def test_evaluate_leaves_encoder_weights_and_batch_norm_statistics_unchanged(tiny_digits, mode,
                                                                             data_path):
    encoder = bn_encoder()
    before = snapshot(encoder)
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
    cfg = EvaluationConfig(mode=mode, epochs=2, lr_milestones=(1,), batch_size=32, workers=0,
                           device="cpu", knn_k=20, data_path=data_path)
    train, test, augmented = tiny_digits
    results = evaluate.evaluate(encoder, train, test, 10, cfg, augmented, STATS["digits"])
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert set(results) == {f"{c}_top{k}" for c in ("linear", "mlp", "knn") for k in (1, 5)}
    assert all(0 <= v <= 1 for v in results.values())
    assert results["knn_top1"] > 0.3  # digits are easy even for a random encoder


def test_features_mode_gives_the_same_results_on_both_data_paths(tiny_digits):
    """At 32 px the device path's batch transform equals the PIL one, and the classifiers are
    seeded after the features are read: the data path changes nothing."""
    encoder = bn_encoder()
    results = [evaluate.evaluate(encoder, *tiny_digits[:2], 10, EvaluationConfig(
        mode="features", epochs=2, lr_milestones=(0,), batch_size=32, workers=0, device="cpu",
        knn_k=20, data_path=path), stats=STATS["digits"]) for path in ("loader", "device")]
    assert results[0] == results[1]


def test_evaluate_command_records_schedule_precision_and_data_path(tmp_path):
    path = our_checkpoint(tmp_path / "checkpoint.pt", data="digits", n_classes=10)
    out = tmp_path / "results.json"
    run_cli("evaluate", path, "--mode", "features", "--schedule", "places205", "--epochs", "1",
            "--data-path", "device", "--precision", "fp32", "--device", "cpu", "--out", out)
    report = json.loads(out.read_text())
    assert report["schedule"] == "places205" and report["lr_milestones"] == [7, 12]
    assert report["epochs"] == 1
    assert (report["data_path"], report["precision"], report["device"]) == ("device", "fp32", "cpu")
    assert report["n_train"] == 1437 and 0 <= report["knn_top1"] <= 1
    with pytest.raises(SystemExit):  # argparse: not a schedule
        run_cli("evaluate", path, "--schedule", "places")


def test_evaluate_fails_if_the_encoder_changes(tiny_digits):
    encoder = bn_encoder()
    bn = encoder.layer_list[-1].bn

    def buggy_evaluation(*_):
        bn.running_mean.add_(1.0)

    encoder.register_forward_hook(buggy_evaluation)
    cfg = EvaluationConfig(mode="features", epochs=1, lr_milestones=(), workers=0, device="cpu")
    with pytest.raises(EvaluationError, match="frozen encoder changed"):
        evaluate.evaluate(encoder, *tiny_digits[:2], 10, cfg)


def test_check_unchanged_names_the_changed_statistic():
    encoder = bn_encoder()
    before = snapshot(encoder)
    evaluate.check_unchanged(encoder, before)
    encoder.rkhs_block_5.bn_out.bn.running_var.mul_(1.5)
    with pytest.raises(EvaluationError, match="rkhs_block_5.bn_out.bn.running_var"):
        evaluate.check_unchanged(encoder, before)


def test_knn_scores_match_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    labels[:5] = -1  # unlabelled rows take no part
    test = torch.randn(7, 8, generator=generator)
    k, temperature = 10, 0.07
    scores = evaluate.knn_scores(train, labels, test, 4, k, temperature)
    for i, row in enumerate(test):
        expected = torch.zeros(4)
        similarity = [(float(row @ x / (row.norm() * x.norm())), int(y))
                      for x, y in zip(train, labels) if y >= 0]
        for s, y in sorted(similarity, reverse=True)[:k]:
            expected[y] += np.exp(s / temperature)
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=0)
    # k larger than the training set: every labelled row votes
    assert torch.allclose(evaluate.knn_scores(train, labels, test, 4, 1000).sum(1),
                          evaluate.knn_scores(train, labels, test, 4, 45).sum(1))


def test_topk_correct():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    assert evaluate.topk_correct(scores, labels, 1) == 1
    assert evaluate.topk_correct(scores, labels, 2) == 2
    assert evaluate.topk_correct(scores, labels, 5) == 3  # k capped at the 3 classes


def test_features_cover_the_whole_test_set_in_order(tiny_digits):
    encoder = bn_encoder()
    test = tiny_digits[1]
    out = extract.extract_features(encoder, test, torch.device("cpu"), batch_size=7)
    assert out["features"].shape == (60, 64) and out["labels"].tolist() == test.labels.tolist()
    alone = encoder.global_features(torch.stack([test[i][0] for i in (0, 59)]))
    torch.testing.assert_close(out["features"][[0, 59]], alone, rtol=1e-5, atol=1e-5)


def test_schedules_default_from_the_data_not_the_class_count():
    for data, name in (("cifar10", "cifar"), ("STL10", "cifar"), ("digits", "cifar"),
                       ("shared/data/cifar100_jpeg_train.npz", "cifar"),
                       ("/data/imagenet", "imagenet"), ("/data/places205", "imagenet")):
        assert evaluate.default_schedule(data) == name, data
    schedule = lambda data, **given: evaluate.with_schedule(EvaluationConfig(**given), data)
    assert (schedule("cifar10").epochs, schedule("cifar10").lr_milestones) == (120, (80, 110))
    assert (schedule("/data/imagenet").epochs, schedule("x").lr_milestones) == (30, (15, 25))
    places = schedule("/data/places205", schedule="places205")
    assert (places.schedule, places.epochs, places.lr_milestones) == ("places205", 15, (7, 12))
    mine = schedule("cifar10", schedule="imagenet", epochs=3, lr_milestones=())
    assert (mine.schedule, mine.epochs, mine.lr_milestones) == ("imagenet", 3, ())
    with pytest.raises(ValueError, match="schedule must be one of"):
        EvaluationConfig(schedule="places")


def test_classifier_lr_follows_the_pretraining_rule_and_the_authors_schedule(monkeypatch):
    """The lr of each epoch is the authors' MultiStepLR([m + 1 ...], 0.2) stepped per epoch."""
    cfg = EvaluationConfig(epochs=8, lr_milestones=(2, 5), lr=1.0)
    seen = []

    def record(probes, optimizer, batches):
        seen.append(optimizer.param_groups[0]["lr"])
        return torch.zeros(())

    monkeypatch.setattr(evaluate, "train_epoch", record)
    evaluate.train_probes(Probes(4, 2), lambda: [], cfg)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(reference, [3, 6], gamma=0.2)
    expected = []
    for _ in range(8):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-12) and seen[3] == pytest.approx(0.2)


def test_evaluate_command_on_our_checkpoint_writes_json_beside_it(tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    path = our_checkpoint(tmp_path / "checkpoint.pt", data=folder, use_bn=True)
    run_cli("evaluate", path, "--mode", "features", "--epochs", "3", "--lr-milestones", "2",
            "--workers", "0", "--batch-size", "4")  # --data: the checkpoint's
    report = json.loads((tmp_path / "checkpoint.eval-features.json").read_text())
    assert report["n_train"] == 12 and report["n_test"] == 6 and report["n_classes"] == 2
    assert report["epochs"] == 3 and report["lr_milestones"] == [2] and report["mode"] == "features"
    assert report["schedule"] == "imagenet"
    assert report["knn_top1"] == 1.0  # the two classes differ in brightness
    assert report["linear_top5"] == 1.0  # top-5 of 2 classes
    printed = capsys.readouterr().out
    assert "linear" in printed and "MLP" in printed and "kNN k=12" in printed  # k that ran


def test_evaluate_command_full_mode_with_default_schedule_override(tmp_path):
    folder = image_folder(tmp_path / "images", size=40)
    path = our_checkpoint(tmp_path / "checkpoint.pt", data=folder)
    out = tmp_path / "results.json"
    run_cli("evaluate", path, "--mode", "full", "--epochs", "1", "--workers", "0", "--out", out,
            "--device", "cpu")
    report = json.loads(out.read_text())
    assert report["mode"] == "full" and report["lr_milestones"] == [15, 25]  # folder schedule
    assert report["schedule"] == "imagenet" and report["epochs"] == 1
    assert (report["device"], report["precision"], report["data_path"]) == ("cpu", "fp32", "loader")


def test_evaluate_command_explains_bad_input(tmp_path):
    path = our_checkpoint(tmp_path / "checkpoint.pt", data=tmp_path / "missing")
    with pytest.raises(SystemExit, match="data .*missing is not there.*pass --data"):
        run_cli("evaluate", path, "--mode", "features")
    with pytest.raises(SystemExit, match="neither a known dataset"):
        run_cli("evaluate", path, "--data", tmp_path / "missing")
    (tmp_path / "unlabelled").mkdir()
    with pytest.raises(SystemExit, match="train/ subfolder"):
        run_cli("evaluate", path, "--data", tmp_path / "unlabelled")
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_cli("evaluate", tmp_path / "nothing.pt")
    with pytest.raises(SystemExit, match="batch_size must be >= 2"):
        run_cli("evaluate", path, "--batch-size", "1")


def test_labelled_split_needs_a_test_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="val/ or test/"):
        labelled_split(str(tmp_path), "test", evaluation_transform(32, *STATS["imagenet"]))


def test_embed_accepts_normalised_floats_uint8_and_pil():
    encoder = bn_encoder().train()  # embed must not update batch-norm statistics either
    before = snapshot(encoder)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    normalised = torch.stack([evaluation_transform(32, *STATS["cifar10"])(Image.fromarray(p))
                              for p in pixels])
    expected = encoder.eval().global_features(normalised)
    encoder.train()
    for images in (normalised, pixels, torch.from_numpy(pixels),
                   [Image.fromarray(p) for p in pixels]):
        features = extract.embed(encoder, images, data="cifar10")
        assert features.shape == (3, 64)
        torch.testing.assert_close(features, expected)
    assert encoder.training
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="uint8"):
        extract.embed(encoder, pixels.astype(np.int32))
    with pytest.raises(ValueError, match="normalisation"):
        extract.embed(encoder, pixels, data="mnist")


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_extract_command_saves_features_labels_names(tmp_path, suffix):
    folder = image_folder(tmp_path / "images")
    path = our_checkpoint(tmp_path / "checkpoint.pt", data=folder)
    out = tmp_path / f"features{suffix}"
    run_cli("extract", path, "--out", out, "--maps", "--workers", "0", "--split", "train")
    arrays = extract.load_features(out)
    assert arrays["features"].shape == (12, 64) and arrays["features"].dtype == np.float32
    assert arrays["labels"].tolist() == [0] * 6 + [1] * 6
    assert list(arrays["names"][:2]) == ["train/cat/0.png", "train/cat/1.png"]
    assert list(arrays["classes"]) == ["cat", "dog"]
    assert arrays["r5"].shape == (12, 64, 5, 5) and arrays["r7"].shape == (12, 64, 7, 7)
    encoder = checkpoint.load_encoder(path)
    expected = extract.embed(encoder, [Image.open(folder / "train/dog/5.png")], data="imagenet")
    np.testing.assert_allclose(arrays["features"][-1], expected[0].numpy(), rtol=1e-5, atol=1e-5)


def test_extract_command_reads_unlabelled_folders_and_rejects_bad_names(tmp_path):
    folder = image_folder(tmp_path / "images")
    path = our_checkpoint(tmp_path / "checkpoint.pt", data=folder)
    run_cli("extract", path, "--data", folder / "val", "--out", tmp_path / "f.npz", "--workers", "0")
    arrays = extract.load_features(tmp_path / "f.npz")
    assert arrays["labels"].tolist() == [-1] * 6 and arrays["names"][0] == "cat/0.png"
    with pytest.raises(SystemExit, match=r"\.npz or \.pt"):
        run_cli("extract", path, "--out", tmp_path / "features.txt", "--workers", "0")


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_labelled_split_says_where_torchvision_sets_are_missing(tmp_path, name):
    transform = evaluation_transform(32, *STATS[name])
    with pytest.raises(DataError, match=f"{name} not found under .*--data-root"):
        labelled_split(name, "train", transform, data_root=str(tmp_path))


# -- issue 17: paths that resolve, results that are never lost, settings refused


def test_a_run_with_a_relative_data_path_evaluates_from_another_folder(tmp_path, monkeypatch):
    from amdim.training.pretraining import pretrain

    image_folder(tmp_path / "work" / "images", n_train=8)
    monkeypatch.chdir(tmp_path / "work")
    pretrain(preset("digits", data="images/", run_dir="run", epochs=1, batch_size=8, workers=0,
                    final_probe=False, device="cpu", **TINY))
    # another spelling of the same folder resumes the run
    pretrain(preset("digits", data=str(tmp_path / "work" / "images"), run_dir="run", epochs=2,
                    batch_size=8, workers=0, final_probe=False, device="cpu", **TINY))
    state = checkpoint.load(tmp_path / "work" / "run" / "checkpoint.pt")
    assert state["config"]["data"] == str(tmp_path / "work" / "images")
    assert state["data_fingerprint"] == {"train_images": 16, "n_classes": 2}
    monkeypatch.chdir(tmp_path)
    run_cli("evaluate", "work/run/checkpoint.pt", "--mode", "features", "--epochs", "1",
            "--workers", "0", "--batch-size", "4", "--out", "results/eval.json")
    assert json.loads((tmp_path / "results" / "eval.json").read_text())["n_train"] == 16


def test_results_that_cannot_be_written_are_printed_first(tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    path = our_checkpoint(tmp_path / "checkpoint.pt", data=folder)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the results to .*printed above"):
        run_cli("evaluate", path, "--mode", "features", "--epochs", "1", "--workers", "0",
                "--batch-size", "4", "--out", tmp_path / "file" / "eval.json")
    assert json.loads(capsys.readouterr().out)["n_train"] == 12
    with pytest.raises(SystemExit, match="amdim extract: cannot write the features"):
        run_cli("extract", path, "--workers", "0", "--out", tmp_path / "file" / "f.npz")
    run_cli("extract", path, "--workers", "0", "--out", tmp_path / "new" / "folder" / "f.npz")
    assert (tmp_path / "new" / "folder" / "f.npz").exists()


@pytest.mark.parametrize("flags, message", [
    (["--knn-temperature", "0"], r"knn_temperature must be > 0 \(e.g. --knn-temperature 0.07\)"),
    (["--device", "gpu"], "'gpu' is not a device .a GPU is cuda"),
])
def test_evaluate_refuses_bad_settings(tmp_path, flags, message):
    path = our_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match=message):
        run_cli("evaluate", path, "--mode", "features", *flags)


# --- the authors' protocol and transfer evaluation (issue 15) ------------------------------

@pytest.mark.parametrize("data_path", ["loader", "device"])
def test_authors_protocol_differs_from_the_standard_one_only_by_the_batch_norm_refresh(
        tiny_digits, monkeypatch, data_path):
    train, test, _ = tiny_digits  # 60 test images: batches of 20 score all of them
    cfg = dict(mode="features", epochs=2, lr_milestones=(1,), batch_size=20, workers=0,
               device="cpu", knn_k=20, data_path=data_path)
    encoder = bn_encoder()
    standard = evaluate.evaluate(copy.deepcopy(encoder), train, test, 10,
                                 EvaluationConfig(**cfg), stats=STATS["digits"])
    # with the refresh made a no-op, the authors' protocol gives the standard numbers
    refreshed, refresh = [], evaluate.refresh_batch_norm

    def no_refresh(encoder, probes, batches, precision="fp32", max_batches=50):
        refreshed.append([labels for _, labels in batches])
        return refresh(encoder, probes, [], precision)  # a copy in eval mode, unchanged

    monkeypatch.setattr(evaluate, "refresh_batch_norm", no_refresh)
    authors_cfg = EvaluationConfig(protocol="authors", **cfg)
    without = evaluate.evaluate(copy.deepcopy(encoder), train, test, 10, authors_cfg,
                                stats=STATS["digits"])
    assert without.pop("n_test_scored") == 60 and without == standard
    # the refresh reads shuffled full batches of the test set
    (batches,) = refreshed
    assert [len(b) for b in batches] == [20, 20, 20]
    assert sorted(torch.cat(batches).tolist()) == sorted(test.labels.tolist())
    monkeypatch.undo()
    before = snapshot(encoder)
    authors = evaluate.evaluate(encoder, train, test, 10, authors_cfg, stats=STATS["digits"])
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    assert authors["n_test_scored"] == 60 and authors != {**standard, "n_test_scored": 60}


def test_refresh_moves_a_copys_batch_norm_statistics_to_the_test_images():
    encoder, probes = bn_encoder(), Probes(64, 10)
    before = snapshot(encoder)
    images = torch.randn(8, 3, 32, 32) * 3 + 2  # far from the statistics bn_encoder saw
    scorer = evaluate.refresh_batch_norm(encoder, probes, [(images, None)] * 60)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    bn = scorer.layer_list[-1].bn
    assert not scorer.training and not probes.training
    assert not torch.equal(bn.running_mean, encoder.layer_list[-1].bn.running_mean)
    assert int(bn.num_batches_tracked) == int(encoder.layer_list[-1].bn.num_batches_tracked) + 50


def test_authors_protocol_drops_the_last_partial_batch(tiny_digits):
    train, test, _ = tiny_digits
    cfg = EvaluationConfig(mode="features", epochs=1, lr_milestones=(), batch_size=25,
                           workers=0, device="cpu", knn_k=20, protocol="authors")
    results = evaluate.evaluate(bn_encoder(), train, test, 10, cfg)
    assert results["n_test_scored"] == 50  # 2 full batches of 25 of the 60 test images
    with pytest.raises(EvaluationError, match="fewer than --batch-size"):
        evaluate.evaluate(bn_encoder(), train, test, 10, replace_cfg(cfg, batch_size=64))
    with pytest.raises(ValueError, match="protocol must be"):
        EvaluationConfig(protocol="transductive")


def replace_cfg(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_evaluate_on_other_data_is_reported_as_a_transfer(tmp_path):
    folder = image_folder(tmp_path / "images")
    path = our_checkpoint(tmp_path / "checkpoint.pt", data="digits", n_classes=10)
    out = tmp_path / "places.json"
    run_cli("evaluate", path, "--data", folder, "--schedule", "places205", "--mode", "features",
            "--epochs", "2", "--workers", "0", "--batch-size", "4", "--device", "cpu",
            "--protocol", "authors", "--out", out)
    report = json.loads(out.read_text())
    assert report["transfer"] is True and report["encoder_data"] == "digits"
    assert report["data"] == str(folder) and report["n_classes"] == 2  # the new label set
    assert report["schedule"] == "places205" and report["protocol"] == "authors"
    assert report["n_test_scored"] == 4  # 6 test images, batches of 4, drop_last
    own = tmp_path / "own.json"
    run_cli("evaluate", path, "--mode", "features", "--epochs", "1", "--device", "cpu",
            "--data-path", "device", "--out", own)
    report = json.loads(own.read_text())
    assert report["transfer"] is False and report["protocol"] == "standard"
    assert "n_test_scored" not in report
