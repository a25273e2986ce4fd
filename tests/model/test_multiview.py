"""AMDIM on K views from the data: the objective over view pairs, one encoder per view,
training (resume, two processes), checkpoints and extraction per view."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from amdim.config import preset
from amdim.data.datasets import digits
from amdim.data.image_files import DataError
from amdim.evaluation.classifier_training import EvaluationConfig
from amdim.evaluation.evaluate import ConcatenatedViews, evaluate_checkpoint
from amdim.evaluation.extract import extract, load_features
from amdim.model.encoder import Features
from amdim.model.multiview import MultiViewAMDIM, multiview_nce, view_layout
from amdim.model.nce import SCORE_PENALTY, multiscale_nce
from amdim.training import checkpoint, distributed
from amdim.training.pretraining import TrainingError, pretrain

TINY = dict(ndf=8, n_rkhs=64, n_depth=1, batch_size=16, steps_per_epoch=3, warmup_steps=4,
            workers=0, final_probe=False, device="cpu")
LAB = view_layout((("L", 1), ("ab", 2)), "auto", "lab")


def tiny(run_dir, **overrides):
    return preset("digits", run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def colour_digits(tmp_path_factory):
    """The digits (1437 train / 360 test) tinted one colour per class, as a compact .npz
    pair (JPEG streams): --views lab refuses grey images."""
    import io

    root = tmp_path_factory.mktemp("colour_digits")
    tints = np.random.default_rng(0).integers(64, 256, (10, 3))
    for split in ("train", "test"):
        images, labels = digits(split)
        streams = []
        for image, label in zip(images, labels):
            buffer = io.BytesIO()
            tinted = (image.astype(np.uint16) * tints[label] // 255).astype(np.uint8)
            Image.fromarray(tinted).save(buffer, "JPEG", quality=95)
            streams.append(np.frombuffer(buffer.getvalue(), np.uint8))
        np.savez(root / f"digits_{split}.npz", jpeg=np.concatenate(streams),
                 offsets=np.cumsum([0] + [len(s) for s in streams]), labels=labels,
                 classes=np.array([str(c) for c in range(10)]))
    return str(root / "digits_train.npz")


def random_features(batch, dim, generator):
    return Features(*(torch.randn(batch, dim, side, side, generator=generator)
                      for side in (1, 5, 7)))


def naive_task(source, target, tclip):
    """-mean log p(positive) of source vectors (B, D) against target maps (B, D, H, W), and
    the score penalty, one image and location at a time."""
    batch, dim = source.shape
    maps = target.flatten(2)  # (B, D, L)
    raw = torch.einsum("bd,cdl->bcl", source, maps) / math.sqrt(dim)  # (B, B, L)
    clipped = tclip * torch.tanh(raw / tclip)
    losses = []
    for b in range(batch):
        negatives = torch.cat([clipped[b, c] for c in range(batch) if c != b])
        for location in range(maps.shape[2]):
            positive = clipped[b, b, location]
            losses.append(-(positive - torch.logsumexp(torch.cat([positive[None], negatives]), 0)))
    return torch.stack(losses).mean(), SCORE_PENALTY * raw.square().mean()


def test_multiview_nce_sums_both_directions_of_every_pair():
    g = torch.Generator().manual_seed(0)
    batch, dim, tclip = 4, 16, 20.0
    features = [random_features(batch, dim, g) for _ in range(3)]
    locations = [torch.randint(0, 25, (batch,), generator=g) for _ in range(3)]
    pair = lambda f1, f2, locs: multiscale_nce(f1, f2, tclip, locs)
    out = multiview_nce(features, pair, locations)
    expected = dict.fromkeys(out, 0.0)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            source, target = features[i], features[j]
            r5 = source.r5.flatten(2)[torch.arange(batch), :, locations[i]]  # (B, D)
            for name, vectors, maps in (("loss_1t5", source.r1.flatten(1), target.r5),
                                        ("loss_1t7", source.r1.flatten(1), target.r7),
                                        ("loss_5t5", r5, target.r5)):
                loss, penalty = naive_task(vectors, maps, tclip)
                # half the sum over ordered pairs: each pair's two directions averaged
                expected[name] = expected[name] + 0.5 * loss
                expected["score_reg"] = expected["score_reg"] + 0.5 * penalty
    for name in out:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6)
    # two views: exactly the two-view objective
    two = multiview_nce(features[:2], pair, locations[:2])
    for name, value in multiscale_nce(*features[:2], tclip, tuple(locations[:2])).items():
        torch.testing.assert_close(two[name], value)


def test_one_encoder_per_view_or_one_shared():
    cfg = tiny("unused", views="lab")
    model = MultiViewAMDIM(cfg, 10, LAB)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["encoder.L.layer_list.0.conv.weight"] == (8, 1, 3, 3)
    assert shapes["encoder.ab.layer_list.0.conv.weight"] == (8, 2, 3, 3)
    assert shapes["probes.all.block_glb_lin.block_forward.2.weight"] == (10, 128)  # 2 x n_rkhs
    assert shapes["probes.L.block_glb_lin.block_forward.2.weight"] == (10, 64)
    out = model(torch.randn(4, 1, 32, 32), torch.randn(4, 2, 32, 32), torch.arange(4))
    assert torch.isfinite(out["loss"]) and out["n_labelled"] == 4
    with pytest.raises(ValueError, match=r"view .L. takes \(B, 1, S, S\).*order L, ab"):
        model(torch.randn(4, 2, 32, 32), torch.randn(4, 1, 32, 32), torch.arange(4))
    cameras = view_layout((("left", 3), ("right", 3)))
    assert cameras["shared"]
    shared = MultiViewAMDIM(cfg, 0, cameras)
    assert "encoder.layer_list.0.conv.weight" in dict(shared.named_parameters())
    assert not view_layout((("left", 3), ("right", 3)), "separate")["shared"]
    with pytest.raises(ValueError, match="one channel count"):
        view_layout((("rgb", 3), ("depth", 1)), "shared")


def test_mixture_heads_and_bf16_with_one_encoder_per_view():
    model = MultiViewAMDIM(tiny("unused", views="lab", n_mixtures=3), 10, LAB)
    views = (torch.randn(4, 1, 32, 32), torch.randn(4, 2, 32, 32))
    out = model(*views, torch.arange(4))
    assert torch.isfinite(out["loss"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(*views, torch.arange(4), source_locations=[torch.zeros(4, dtype=torch.long)] * 2)
    assert torch.isfinite(half["loss"]) and half["loss"].dtype == torch.float32


@pytest.mark.slow
def test_lab_run_resumes_exactly_and_loads_per_view(tmp_path, colour_digits):
    lab = dict(views="lab", view_augment=True, data=colour_digits)
    pretrain(tiny(tmp_path / "straight", epochs=3, **lab))
    pretrain(tiny(tmp_path / "resumed", epochs=1, **lab))
    pretrain(tiny(tmp_path / "resumed", epochs=3, **lab))
    path = tmp_path / "straight" / "checkpoint.pt"
    a, b = checkpoint.load(path), checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert a["views"] == {"names": ["L", "ab"], "channels": [1, 2], "shared": False}
    for part in ("encoder", "probes"):
        assert set(a[part]) == set(b[part])
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)
    line = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("test_linear_acc", "test_linear_acc_L", "test_mlp_acc_ab"):
        assert 0 <= line[key] <= 1
    # per view, all views, and clear refusals
    light = checkpoint.load_encoder(path, view="L")
    assert light.global_features(torch.randn(2, 1, 32, 32)).shape == (2, 64)
    both = checkpoint.load_encoder(path, view="all")
    assert both.global_features([torch.randn(2, 1, 32, 32),
                                 torch.randn(2, 2, 32, 32)]).shape == (2, 128)
    with pytest.raises(checkpoint.CheckpointError, match="one encoder per view of the views L, ab"):
        checkpoint.load_encoder(path)
    with pytest.raises(checkpoint.CheckpointError, match="no view 'depth'.*L, ab"):
        checkpoint.load_encoder(path, view="depth")
    exported = checkpoint.export_encoder(path, tmp_path / "encoder.pt")
    assert torch.equal(checkpoint.load_encoder(exported, view="ab").layer_list[0].conv.weight,
                       a["encoder"]["ab.layer_list.0.conv.weight"])
    features = load_features(extract(str(path), out=str(tmp_path / "f.npz"), view="all",
                                     device="cpu", workers=0))
    assert features["features"].shape == (360, 128) and len(features["classes"]) == 10
    features = load_features(extract(str(path), out=str(tmp_path / "f.npz"), view="ab",
                                     device="cpu", workers=0))
    assert features["features"].shape == (360, 64)


def test_checkpoints_refuse_other_views(tmp_path, colour_digits):
    pretrain(tiny(tmp_path / "augment", epochs=1, data=colour_digits))
    with pytest.raises(checkpoint.CheckpointError, match="--views augment"):
        checkpoint.load_encoder(tmp_path / "augment" / "checkpoint.pt", view="L")
    with pytest.raises(checkpoint.CheckpointError, match="--views augment"):
        evaluate_checkpoint(str(tmp_path / "augment" / "checkpoint.pt"), view="L")
    with pytest.raises(TrainingError, match="views: saved 'augment', requested 'lab'"):
        pretrain(tiny(tmp_path / "augment", epochs=2, views="lab", data=colour_digits))
    with pytest.raises(DataError, match="digits is grey.*--views augment"):  # R = G = B
        pretrain(tiny(tmp_path / "grey", epochs=1, views="lab"))
    assert not (tmp_path / "grey" / "checkpoint.pt").exists()


FAST_EVALUATION = EvaluationConfig(mode="features", epochs=1, lr_milestones=(), device="cpu",
                                   workers=0, knn_k=5)


def test_evaluate_one_view_or_all_views_of_a_lab_run(tmp_path, colour_digits):
    from tests.evaluation.test_evaluate import run_cli

    pretrain(tiny(tmp_path / "run", epochs=1, views="lab", data=colour_digits))
    path = tmp_path / "run" / "checkpoint.pt"
    light = evaluate_checkpoint(str(path), cfg=FAST_EVALUATION, view="L")
    assert light["out"] == str(tmp_path / "run" / "checkpoint.eval-features-L.json")
    saved = json.loads((tmp_path / "run" / "checkpoint.eval-features-L.json").read_text())
    assert saved["view"] == "L" and saved["mode"] == "features" and saved["epochs"] == 1
    assert (saved["n_train"], saved["n_test"], saved["n_classes"]) == (1437, 360, 10)
    for name in ("linear", "mlp", "knn"):
        assert 0 <= saved[f"{name}_top1"] <= saved[f"{name}_top5"] <= 1
    run_cli("evaluate", path, "--view", "all", "--mode", "features", "--epochs", 2,
            "--lr-milestones", "--device", "cpu", "--workers", 0, "--knn-k", 5)
    both = json.loads((tmp_path / "run" / "checkpoint.eval-features-all.json").read_text())
    assert both["view"] == "all" and both["epochs"] == 2 and both["n_test"] == 360
    assert 0 <= both["knn_top1"] <= both["knn_top5"] <= 1
    # all: the concatenated global features that amdim extract --view all saves
    views = checkpoint.load_encoder(path, view="all")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ConcatenatedViews(views)(images).r1.flatten(1),
                               views.global_features([images[:, :1], images[:, 1:]]))
    # mode full: the lab augmentation (crop and flip) of the views
    full = evaluate_checkpoint(str(path), cfg=EvaluationConfig(
        mode="full", epochs=1, lr_milestones=(), device="cpu", workers=0, knn_k=5), view="ab")
    assert full["view"] == "ab" and full["out"].endswith("checkpoint.eval-full-ab.json")
    with pytest.raises(SystemExit, match=r"one encoder per view of the views L, ab.*--view NAME"):
        run_cli("evaluate", path, "--mode", "features", "--device", "cpu")
    with pytest.raises(SystemExit, match=r"no view 'depth'; its views are L, ab \(or all\)"):
        run_cli("evaluate", path, "--view", "depth", "--device", "cpu")
    with pytest.raises(SystemExit, match="data loader path"):
        run_cli("evaluate", path, "--view", "L", "--data-path", "device", "--device", "cpu")


def paired_npz(path, n=40):
    """Three views of n contexts: two 'cameras' (3 channels, 32 and 48 px) and a 1-channel
    one; class = whether the scene is bright."""
    rng = np.random.default_rng(0)
    bright = rng.integers(0, 2, n)
    scene = rng.integers(0, 128, (n, 48, 48, 3)) + 127 * bright[:, None, None, None]
    np.savez(path, view_left=scene[:, 8:40, 8:40].astype(np.uint8),
             view_right=scene.astype(np.uint8), view_gray=scene.mean(3).astype(np.uint8),
             labels=bright)
    return path


@pytest.mark.slow
def test_three_paired_views_train_and_a_changed_layout_is_refused(tmp_path):
    data = paired_npz(tmp_path / "scenes_train.npz")
    paired_npz(tmp_path / "scenes_test.npz", n=20)
    metrics = pretrain(tiny(tmp_path / "run", epochs=1, views="paired", data=str(data),
                            final_probe=True))
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    assert state["views"] == {"names": ["gray", "left", "right"], "channels": [1, 3, 3],
                              "shared": False}
    assert {"test_linear_acc_gray", "final_linear_probe_acc_right",
            "random_init_linear_probe_acc"} <= set(metrics)
    features = load_features(extract(str(path), out=str(tmp_path / "f.npz"), view="gray",
                                     device="cpu", workers=0))
    assert features["features"].shape == (20, 64) and features["classes"].tolist() == ["0", "1"]
    for view in ("gray", "all"):  # 1 channel; 1 + 3 + 3 channels, three encoders
        report = evaluate_checkpoint(str(path), cfg=FAST_EVALUATION, view=view)
        assert report["view"] == view and (report["n_train"], report["n_test"]) == (40, 20)
        assert 0 <= report["linear_top1"] <= 1 and report["n_classes"] == 2
    for path in (data, tmp_path / "scenes_test.npz"):  # the gray view gone
        np.savez(path, **{k: v for k, v in np.load(path).items() if k != "view_gray"})
    with pytest.raises(TrainingError, match=r"gray \(1 channels\)"):
        pretrain(tiny(tmp_path / "run", epochs=2, views="paired", data=str(data)))


def test_two_cameras_share_one_encoder(tmp_path):
    data = paired_npz(tmp_path / "cameras.npz")
    np.savez(data, **{k: v for k, v in np.load(data).items() if k != "view_gray"})
    pretrain(tiny(tmp_path / "run", epochs=1, views="paired", data=str(data)))
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    assert state["views"] == {"names": ["left", "right"], "channels": [3, 3], "shared": True}
    assert "layer_list.0.conv.weight" in state["encoder"]  # one encoder, the paper's names
    encoder = checkpoint.load_encoder(path, view="right")
    assert torch.equal(encoder.layer_list[0].conv.weight, state["encoder"]["layer_list.0.conv.weight"])
    with pytest.raises(checkpoint.CheckpointError, match="one encoder shared by the views left, right"):
        checkpoint.load_encoder(path)
    with pytest.raises(DataError, match="cameras.npz has no test split of its views"):
        evaluate_checkpoint(str(path), cfg=FAST_EVALUATION, view="all")


class Scenes(torch.utils.data.Dataset):
    """The Python API: any Dataset of (views tuple, label): a 40 px colour view and a 24 px
    depth-like view of the same random scene; `classes` gives the probes their classes."""

    classes = ["dark", "bright"]

    def __len__(self):
        return 48

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        scene = rng.integers(0, 128, (40, 40, 3)) + 127 * (i % 2)
        return (scene.astype(np.uint8), scene[::2, ::2, :1].astype(np.uint8)[8:32, 8:32]), i % 2


def test_your_own_dataset_of_view_tuples(tmp_path):
    metrics = pretrain(tiny(tmp_path / "run", epochs=1, views="paired", data="scenes"),
                       view_data=(Scenes(), Scenes()))
    assert 0 <= metrics["test_linear_acc_view1"] <= 1
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert state["views"] == {"names": ["view0", "view1"], "channels": [3, 1], "shared": False}
    with pytest.raises(ValueError, match="--views paired"):
        pretrain(tiny(tmp_path / "other", views="lab"), view_data=Scenes())


# -- two processes (gloo) train exactly like one on the concatenated batch, two encoders

BATCH = 8


def fixed_views():
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(BATCH, 1, 32, 32, generator=g), torch.randn(BATCH, 2, 32, 32, generator=g))
    locations = [torch.randint(0, 25, (BATCH,), generator=g) for _ in range(2)]
    return views, torch.zeros(BATCH, dtype=torch.int64), locations


def build():
    torch.manual_seed(0)  # no probes: each rank's probes see only its own images
    return MultiViewAMDIM(tiny("unused", views="lab", lr=1e-3), 0, LAB)


def one_step(model, step_model, views, labels, locations):
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)  # see test_distributed.py
    out = step_model(*views[:2], labels, source_locations=locations)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimiser.step()
    return out["loss"].detach(), grads


def worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    distributed.setup(torch.device("cpu"))
    views, labels, locations = fixed_views()
    part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    model = build()
    model.encoder = distributed.synchronise_batchnorm(model.encoder)
    model.gather = distributed.gather
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    result = one_step(model, ddp, [v[part] for v in views], labels[part],
                      [loc[part] for loc in locations])
    running = {k: v for k, v in model.state_dict().items() if "running" in k}
    torch.save((result, running), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_encoders(tmp_path):
    from tests.training.test_distributed import close, free_port

    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    model = build()
    loss, grads = one_step(model, model, *fixed_views())
    running = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert any(k.startswith("encoder.L.") for k in grads) and any(
        k.startswith("encoder.ab.") for k in grads)
    for rank in range(2):
        (d_loss, d_grads), d_running = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(d_loss, loss, rtol=1e-5, atol=1e-6)
        assert set(d_grads) == set(grads)
        for name in grads:
            assert close(d_grads[name], grads[name]), name
        for name in running:
            torch.testing.assert_close(d_running[name], running[name], rtol=1e-4, atol=1e-6,
                                       msg=name)
