"""AMDIM on K views of a context that the data supplies: one encoder per view (views that
differ in channels or meaning) or one shared (views of one kind, e.g. two cameras), the
multiscale NCE summed over every pair of views, and probes per view and on all views.

Objective: sum over unordered pairs {i, j} of multiscale_nce(f_i, f_j), each the mean of its
two directions, i.e. half the sum over the K(K-1) ordered pairs (i -> j): with K = 2 exactly
the two-view AMDIM objective. Cost: K encoder passes and K(K-1) directional tasks, each three
(B, D) x (D, B*L) score matmuls as in two-view AMDIM: 3 views cost 3x the NCE of 2, 4 views 6x.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import PretrainConfig
from .backbones import build_encoder
from .classifiers import Probes, clipped_cross_entropy
from .encoder import Features
from .nce import OBJECTIVE_TERMS, multiscale_nce, objective

ALL = "all"  # the probes on the concatenation of every view's global feature

# (source, target, (source locations, target locations)) -> the NCE terms of one view pair
PairNCE = Callable[[Features, Features, tuple[torch.Tensor, torch.Tensor]], dict]


def multiview_nce(features: list[Features], pair_nce: PairNCE,
                  source_locations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The NCE terms summed over every unordered pair of the K >= 2 views' features.

    features: K Features of the same B contexts; pair_nce(f_i, f_j, (loc_i, loc_j)): the terms
    of one pair, both directions averaged (e.g. nce.multiscale_nce); source_locations: K (B,)
    flat 5x5 indices, view k's 5t5 source location whenever it is the source.
    """
    if len(features) < 2:
        raise ValueError(f"NCE needs at least two views of each context, got {len(features)}")
    losses = dict.fromkeys(OBJECTIVE_TERMS, 0.0)
    for i, j in combinations(range(len(features)), 2):
        pair = pair_nce(features[i], features[j], (source_locations[i], source_locations[j]))
        for name in OBJECTIVE_TERMS:
            losses[name] = losses[name] + pair[name]
    return losses


def view_layout(layout, view_encoders: str = "auto", mode: str = "paired") -> dict:
    """The checkpointed description of the views: {"names", "channels", "shared"}."""
    names, channels = (list(x) for x in zip(*layout))
    if view_encoders == "shared" and len(set(channels)) > 1:
        raise ValueError(f"--view-encoders shared needs views with one channel count; these "
                         f"have {dict(zip(names, channels))}: use separate (or auto)")
    shared = (view_encoders == "shared" or
              (view_encoders == "auto" and mode != "lab" and len(set(channels)) == 1))
    return {"names": names, "channels": channels, "shared": shared}


class MultiViewAMDIM(nn.Module):
    """forward(x1, x2, labels[, *more views], source_locations=None) -> dict of scalars, as
    model.AMDIM: view k (B, C_k, S, S) in layout order. `encoder` is the shared encoder, or a
    ModuleDict of one encoder per view (keyed by view name; the first convolution of each takes
    its view's channels). `probes` is a ModuleDict: one per view and `all` on the concatenated
    global features; the `correct_*` outputs are those of `all`."""

    def __init__(self, cfg: PretrainConfig, n_classes: int, layout: dict):
        super().__init__()
        self.tclip, self.mixture_entropy = cfg.tclip, cfg.mixture_entropy
        self.view_layout = layout
        self.views = tuple(layout["names"])
        configs = [replace(cfg.encoder, in_channels=c) for c in layout["channels"]]
        self.encoder = (build_encoder(configs[0]) if layout["shared"] else
                        nn.ModuleDict({n: build_encoder(c) for n, c in zip(self.views, configs)}))
        width = len(self.views) * cfg.n_rkhs
        self.probes = nn.ModuleDict(
            {**{n: Probes(cfg.n_rkhs, n_classes) for n in self.views},
             ALL: Probes(width, n_classes)}) if n_classes else None
        self.mixture_head = None
        if cfg.n_mixtures > 1:
            from .mixture import MixtureHead

            self.mixture_head = MixtureHead(cfg.n_rkhs, cfg.n_mixtures)
        # set by distributed training: (b, ...) per rank -> (N*b, ...), keeping gradients
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def encoder_of(self, view: str) -> nn.Module:
        return self.encoder if self.view_layout["shared"] else self.encoder[view]

    def encode(self, views) -> list[Features]:
        if len(views) != len(self.views):
            raise ValueError(f"this model takes {len(self.views)} views ({', '.join(self.views)}), "
                             f"got {len(views)}")
        for name, channels, x in zip(self.views, self.view_layout["channels"], views):
            if x.dim() != 4 or x.shape[1] != channels:
                raise ValueError(f"view {name!r} takes (B, {channels}, S, S) images, got "
                                 f"{tuple(x.shape)}; the views go in the order "
                                 f"{', '.join(self.views)}")
        # one pass per view: batch norm sees each view alone
        return [self.encoder_of(name)(x) for name, x in zip(self.views, views)]

    def pair_nce(self, f1: Features, f2: Features,
                 source_locations: tuple[torch.Tensor, torch.Tensor]) -> dict:
        if self.mixture_head is None:
            return multiscale_nce(f1, f2, self.tclip, source_locations)
        from .mixture import multiscale_mixture_nce

        return multiscale_mixture_nce(f1, f2, self.mixture_head, self.tclip,
                                      self.mixture_entropy, source_locations)

    def nce(self, features: list[Features], source_locations=None) -> dict[str, torch.Tensor]:
        if source_locations is None:  # the random 5x5 source location per image and view
            batch, device = features[0].r5.shape[0], features[0].r5.device
            source_locations = [torch.randint(0, 25, (batch,), device=device) for _ in features]
        if self.gather is not None:  # this rank's contexts -> the global batch, in rank order
            features = [Features(*map(self.gather, f)) for f in features]
            source_locations = [self.gather(loc) for loc in source_locations]
        return multiview_nce(features, self.pair_nce, list(source_locations))

    def probe_logits(self, features: list[torch.Tensor]) -> dict[str, tuple]:
        """K global features (B, D[, 1, 1]) -> {view or all: (logits_mlp, logits_linear)}."""
        flat = [f.flatten(1) for f in features]
        inputs = {**dict(zip(self.views, flat)), ALL: torch.cat(flat, 1)}
        return {name: self.probes[name](x) for name, x in inputs.items()}

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: torch.Tensor,
                *more_views: torch.Tensor, source_locations=None) -> dict[str, torch.Tensor]:
        features = self.encode((x1, x2, *more_views))
        out = self.nce(features, source_locations)
        out["loss"] = objective(out)
        if self.probes is None:
            return out
        # the probes read detached global features of every view, and of all together
        logits = self.probe_logits([f.r1 for f in features])
        out["probe_loss"] = sum(clipped_cross_entropy(mlp, labels)
                                + clipped_cross_entropy(linear, labels)
                                for mlp, linear in logits.values())
        out["loss"] = out["loss"] + out["probe_loss"]
        mlp, linear = logits[ALL]
        out["correct_mlp"] = (mlp.argmax(1) == labels).sum()
        out["correct_linear"] = (linear.argmax(1) == labels).sum()
        out["n_labelled"] = (labels >= 0).sum()
        return out


def build_model(cfg: PretrainConfig, n_classes: int, layout: dict | None) -> nn.Module:
    """model.AMDIM for --views augment (layout None), else MultiViewAMDIM."""
    if layout is None:
        from .amdim import AMDIM

        return AMDIM(cfg, n_classes)
    return MultiViewAMDIM(cfg, n_classes, layout)


@torch.no_grad()
def probe_accuracy(model: MultiViewAMDIM, loader: DataLoader, device: torch.device, autocast
                   ) -> dict[str, float]:
    """Test accuracy of the online probes of every view and of all views (eval mode):
    test_linear_acc / test_mlp_acc for all, test_linear_acc_<view> / test_mlp_acc_<view>."""
    was_training = model.training
    model.eval()
    correct: dict[str, torch.Tensor] = {}
    count = 0
    for views, labels in loader:
        views, labels = [v.to(device) for v in views], labels.to(device)
        with autocast():
            logits = model.probe_logits([f.r1 for f in model.encode(views)])
        for name, (mlp, linear) in logits.items():
            hits = torch.stack([(linear.argmax(1) == labels).sum(), (mlp.argmax(1) == labels).sum()])
            correct[name] = correct.get(name, 0) + hits
        count += len(labels)
    model.train(was_training)
    out = {}
    for name, hits in correct.items():
        suffix = "" if name == ALL else f"_{name}"
        linear, mlp = (hits / max(count, 1)).tolist()
        out[f"test_linear_acc{suffix}"], out[f"test_mlp_acc{suffix}"] = linear, mlp
    return out


@torch.no_grad()
def view_features(model: MultiViewAMDIM, dataset: Dataset, device: torch.device,
                  batch_size: int = 256) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({view: (N, n_rkhs) global features, all: their concatenation}, labels (N,)) of a
    ViewSet, in eval mode, in order."""
    was_training = model.training
    model.eval()
    parts, labels = {name: [] for name in model.views}, []
    for views, label in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        for name, f in zip(model.views, model.encode([v.to(device) for v in views])):
            parts[name].append(f.r1.flatten(1).float().cpu())
        labels.append(label)
    model.train(was_training)
    features = {name: torch.cat(chunks) for name, chunks in parts.items()}
    features[ALL] = torch.cat(list(features.values()), 1)
    return features, torch.cat(labels)


def compare_with_random_init(model: MultiViewAMDIM, cfg: PretrainConfig, train_set: Dataset,
                             test_set: Dataset, device: torch.device, max_images: int = 0
                             ) -> dict[str, float]:
    """Linear-probe accuracy (logistic regression on standardised frozen global features) of
    every view's encoder and of all views together, trained and at random init (the same
    architecture, seed cfg.seed). train_set: a ViewSet, used without augmentation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    plain = replace_train(train_set)
    if 0 < max_images < len(plain):
        sample = torch.randperm(len(plain), generator=torch.Generator().manual_seed(cfg.seed))
        plain = Subset(plain, sample[:max_images].tolist())
    torch.manual_seed(cfg.seed)
    random_init = MultiViewAMDIM(cfg, 0, model.view_layout).to(device)
    out = {}
    for prefix, encoder in (("final", model), ("random_init", random_init)):
        train, train_labels = view_features(encoder, plain, device)
        test, test_labels = view_features(encoder, test_set, device)
        keep = train_labels >= 0
        for name in train:
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(train[name][keep].numpy(), train_labels[keep].numpy())
            suffix = "" if name == ALL else f"_{name}"
            out[f"{prefix}_linear_probe_acc{suffix}"] = float(
                probe.score(test[name].numpy(), test_labels.numpy()))
    print("linear probe on frozen features (trained | random init): " + ", ".join(
        f"{name} {100 * out['final_linear_probe_acc' + s]:.1f}% | "
        f"{100 * out['random_init_linear_probe_acc' + s]:.1f}%"
        for name, s in [(n, f"_{n}") for n in model.views] + [(ALL, "")]))
    return out


def replace_train(dataset: Dataset) -> Dataset:
    """A copy of a ViewSet serving its items without augmentation."""
    import copy

    plain = copy.copy(dataset)
    plain.train = False
    return plain


def check_layout(saved: dict | None, current: dict | None, path) -> None:
    """Refuse to resume or load a checkpoint whose views differ from the data's."""
    def shown(layout):
        if layout is None:
            return "two augmented views of each image, one encoder (--views augment)"
        kind = "one shared encoder" if layout["shared"] else "one encoder per view"
        return ", ".join(f"{n} ({c} channels)" for n, c in zip(layout["names"],
                                                             layout["channels"])) + f", {kind}"
    if saved != current:
        raise ValueError(f"{path} was trained on the views {shown(saved)}; the data and "
                         f"settings now give {shown(current)}. Use the same views, or start "
                         "a new run with another --run-dir")


class ViewsEncoder(nn.Module):
    """Every view's encoder of a MultiViewAMDIM as one: forward(views: K tensors
    (B, C_k, S, S)) -> K Features; global_features(views) -> (B, K*n_rkhs), in view order."""

    def __init__(self, model: MultiViewAMDIM):
        super().__init__()
        self.model = model
        self.views, self.view_layout = model.views, model.view_layout

    def forward(self, views) -> list[Features]:
        return self.model.encode(list(views))

    def global_features(self, views) -> torch.Tensor:
        return torch.cat([f.r1.flatten(1) for f in self(views)], 1)
