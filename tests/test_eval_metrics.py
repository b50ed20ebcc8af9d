"""Metric plumbing of `minfm eval` with a small random-weight feature extractor (no Inception weights)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from eval_helpers import TinyExtractor, images, save_npz
from minfm_core.cli.main import main as cli
from minfm_core.errors import MinfmError
from minfm_plugins.eval.evaluate import compute_metrics, evaluate, extract_features
from minfm_plugins.eval.metrics import feature_stats, frechet_distance, inception_score, precision_recall




# ---- the numbers ------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero(tmp_path):
    path = save_npz(tmp_path / "x.npz", images(40, 0))
    m = evaluate(path, path, extractor=TinyExtractor(), device="cpu", log=lambda _: None)
    assert m["fid"] == pytest.approx(0, abs=1e-6) and m["sfid"] == pytest.approx(0, abs=1e-6)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["num_samples"] == m["num_reference"] == 40


def test_fid_of_a_different_set_is_positive(tmp_path):
    a, b = save_npz(tmp_path / "a.npz", images(40, 0)), save_npz(tmp_path / "b.npz", images(40, 1, shift=40))
    m = evaluate(a, b, extractor=TinyExtractor(), device="cpu", log=lambda _: None)
    assert m["fid"] > 1e-3 and m["sfid"] > 1e-3


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_closed_form_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)  # do not commute
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_between_gaussian_feature_sets_matches_closed_form():
    """Features drawn from two known Gaussians: the estimate converges to the closed form."""
    rng = np.random.default_rng(1)
    n, d = 200_000, 3
    mu1, mu2 = np.zeros(d), np.array([1.0, -1.0, 0.5])
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    x1, x2 = mu1 + std1 * rng.normal(size=(n, d)), mu2 + std2 * rng.normal(size=(n, d))
    closed = ((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum()  # = 4.25
    assert frechet_distance(*feature_stats(x1), *feature_stats(x2)) == pytest.approx(closed, abs=0.03)


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    # Confident and evenly spread over 10 classes: IS = 10 (its maximum for 10 classes).
    logits = 50.0 * np.eye(10)[np.arange(100) % 10]
    assert inception_score(logits) == pytest.approx(10.0, rel=1e-6)


def test_inception_score_splits_like_adm():
    logits = np.random.default_rng(0).normal(size=(12, 5)) * 3
    parts = [inception_score(logits[:5], split_size=5), inception_score(logits[5:10], split_size=5),
             inception_score(logits[10:], split_size=5)]
    assert inception_score(logits, split_size=5) == pytest.approx(np.mean(parts))


def test_precision_recall_on_separable_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)  # disjoint manifolds
    # Fakes collapsed onto one real point: all realistic (precision 1), no diversity (recall ~0).
    collapsed = np.repeat(real[:1], 50, axis=0)
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.05
    # Fakes covering half of a two-cluster real set: precision 1, recall 1/2.
    two = np.concatenate([rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100])
    p, r = precision_recall(two, two[:100])
    assert p == 1.0 and r == 0.5


def _exact_precision_recall(real, fake, k=3):
    """Brute force in float64: the numbers precision_recall must give."""
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((fake[:, None] - real[None]) ** 2).sum(-1)
    return float((d <= radii(real)[None]).any(1).mean()), float((d.T <= radii(fake)[None]).any(1).mean())


def test_precision_recall_of_features_far_from_the_origin():
    """float32 distances of features offset by 1e4 are rounding noise (the old result: 1.0, 1.0)."""
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(300, 64)) * 1.1, rng.normal(size=(300, 64))
    exact = _exact_precision_recall(real, fake)
    assert 0.85 < exact[0] < 0.99 and 0.2 < exact[1] < 0.45
    for offset in (0.0, 1e4):
        p, r = precision_recall(real + offset, fake + offset)
        assert p == pytest.approx(exact[0], abs=1 / 300) and r == pytest.approx(exact[1], abs=1 / 300)
    p, r = precision_recall((real + 1e4).astype(np.float32), (fake + 1e4).astype(np.float32))  # as extractors give
    assert p == pytest.approx(exact[0], abs=0.02) and r == pytest.approx(exact[1], abs=0.02)


class _Broken(TinyExtractor):
    """TinyExtractor with NaN pool features, or pool features of another width."""

    def __init__(self, nan=False, width=None):
        super().__init__()
        self.nan, self.width = nan, width

    def __call__(self, images):
        feats = super().__call__(images)
        if self.nan:
            feats["pool"][0, 0] = float("nan")
        if self.width:
            feats["pool"] = feats["pool"][:, : self.width]
        return feats


def test_non_finite_features_are_one_error_naming_the_source(tmp_path):
    path = save_npz(tmp_path / "x.npz", images(6, 0))
    with pytest.raises(MinfmError, match=f"the feature extractor returned non-finite features for {path}$"):
        evaluate(path, path, extractor=_Broken(nan=True), device="cpu", log=lambda _: None)
    good = extract_features(path, TinyExtractor())
    bad = {**good, "spatial": np.full_like(good["spatial"], np.inf)}
    with pytest.raises(MinfmError, match="non-finite features for reference"):
        compute_metrics(good, bad)


def test_features_of_different_widths_are_one_error(tmp_path):
    path = save_npz(tmp_path / "x.npz", images(6, 0))
    samples = extract_features(path, _Broken(width=5))
    ref = extract_features(path, TinyExtractor())
    with pytest.raises(MinfmError, match="returned pool features of width 5 for samples but 12 for the reference"):
        compute_metrics(samples, ref)


def test_in_training_fid_checks_features_too(tmp_path):
    from minfm_plugins.eval.fid import FidMetric

    ref = save_npz(tmp_path / "r.npz", images(6, 0))
    metric = FidMetric(ref, extractor="eval_helpers:make_extractor")
    reference = metric.stats(metric.reference_features(batch_size=4))
    metric.extractor = _Broken(nan=True)
    u8 = torch.from_numpy(images(3, 1)).permute(0, 3, 1, 2)
    with pytest.raises(MinfmError, match="non-finite features for generated samples"):
        metric.features(u8)
    metric.extractor = _Broken(width=5)
    samples = metric.stats(metric.features(u8))
    with pytest.raises(MinfmError, match="features of width 5 for samples but 12 for the reference"):
        metric.distance(samples, reference)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_compute_metrics_needs_more_images_than_the_neighbours_it_counts(n):
    """Precision and recall take each image's 3rd nearest neighbour in its own set: with 3
    images they quietly took a nearer one (and gave 1.0 / 1.0)."""
    few = {"pool": np.zeros((n, 4)), "spatial": np.zeros((n, 4)), "logits": np.zeros((n, 3))}
    with pytest.raises(MinfmError, match=rf"at least 4 images are needed \(precision and recall use each image's "
                                         rf"3rd nearest neighbour\), found {n}"):
        compute_metrics(few, few)


# ---- inputs and the CLI -----------------------------------------------------------------------


def test_folder_and_npz_give_the_same_features(tmp_path):
    from PIL import Image

    arr = images(7, 3)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i:03d}.png")
    path = save_npz(tmp_path / "x.npz", arr)
    ext = TinyExtractor()
    a = extract_features(tmp_path / "imgs", ext, batch_size=3)
    b = extract_features(path, ext, batch_size=4)
    order = np.argsort([f"{'sub/' if i % 2 else ''}{i:03d}.png" for i in range(7)])  # folder order: sorted paths
    np.testing.assert_allclose(a["pool"], b["pool"][order], rtol=1e-6)


def test_cli_imagenet_and_folder(tmp_path, capsys):
    from PIL import Image

    samples = save_npz(tmp_path / "samples.npz", images(30, 0))
    ref = save_npz(tmp_path / "ref.npz", images(30, 1, shift=30))
    out = tmp_path / "m.json"
    assert cli(["eval", "imagenet", samples, "--ref", ref, "--extractor", "eval_helpers:make_extractor",
                "--out", str(out), "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall", "the seed's table uses 50,000"):
        assert name in text
    m = json.loads(out.read_text())
    assert set(m) >= {"inception_score", "fid", "sfid", "precision", "recall"} and m["fid"] > 0
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, a in enumerate(images(30, 0)):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    assert cli(["eval", "folder", str(folder), "--ref", ref, "--extractor", "eval_helpers:make_extractor",
                "--out", str(tmp_path / "f.json")]) == 0
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["fid"] == pytest.approx(m["fid"], rel=1e-5) and f["precision"] == m["precision"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "imagenet", "missing.npz", "--ref", "r.npz"], "expected an .npz file"),
    (["eval", "folder", "no_such_dir", "--ref", "r.npz"], "no such folder"),
    (["eval", "folder", "{s}", "--ref", "{s}"], "s.npz: a file, not a folder"),  # it said "no such folder"
    (["eval", "imagenet", "{s}", "--ref", "nowhere.npz"], "--ref nowhere.npz"),
    (["eval", "imagenet", "{s}", "--ref", "{s}", "--extractor", "nomodule"], "expected MODULE:ATTR"),
    (["eval", "imagenet", "{bad}", "--ref", "{s}", "--extractor", "eval_helpers:make_extractor"], "uint8 (N, H, W, 3)"),
    # found before the reference set goes through the network (minutes with Inception on 10k images)
    (["eval", "imagenet", "{one}", "--ref", "{s}"], "at least 4 images are needed (precision and recall use each image's 3rd nearest neighbour), found 1"),
    (["eval", "imagenet", "{s}", "--ref", "{s}", "--out", "{tmp}"], "is a folder; name a JSON file to write"),
    (["eval", "imagenet", "{s}", "--ref", "{s}", "--out", "{s}/x.json"], "s.npz is not a folder; name a JSON file"),
    # --out must not replace an input, nor join a folder of them
    (["eval", "imagenet", "{s}", "--ref", "{r}", "--out", "{r}"], "is the --ref file; write the metrics elsewhere"),
    (["eval", "imagenet", "{s}", "--ref", "{r}", "--out", "{tmp}/sub/../s.npz"], "is the samples file"),
    (["eval", "imagenet", "{s}", "--ref", "{r}", "--out", "{link}"], "is the --ref file"),
    (["eval", "folder", "{folder}", "--ref", "{r}", "--out", "{folder}/m.png"], "lies inside the samples folder"),
    (["eval", "imagenet", "{s}", "--ref", "{folder}", "--out", "{folder}/deep/../m.json"],
     "lies inside the --ref folder"),
    (["eval", "imagenet", "{s}", "--ref", "{r}", "--out", "/proc/m.json"], "--out /proc/m.json: cannot write in /proc"),
    # refused by the write only after the whole evaluation (its table printed, its numbers lost)
    (["eval", "imagenet", "{s}", "--ref", "{r}", "--out", "{tmp}/fifo"], "fifo: is a FIFO, not a file; refusing to replace it"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    from PIL import Image

    s = save_npz(tmp_path / "s.npz", images(4, 0))
    r = save_npz(tmp_path / "r.npz", images(4, 1))
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "folder" / "deep").mkdir(parents=True)
    for i, a in enumerate(images(4, 2)):
        Image.fromarray(a).save(tmp_path / "folder" / f"{i}.png")
    (tmp_path / "link.json").symlink_to(r)
    os.mkfifo(tmp_path / "fifo")
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    one = save_npz(tmp_path / "one.npz", images(1, 0))
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 8, 8), np.float32))
    argv = [a.format(s=s, r=r, one=one, tmp=tmp_path, bad=tmp_path / "bad.npz", folder=tmp_path / "folder",
                     link=tmp_path / "link.json") for a in argv]
    assert cli([*argv, "--extractor", "eval_helpers:make_extractor"] if "--extractor" not in argv else argv) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and out == ""  # before any work
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p in inputs} == inputs  # nothing written over
    assert not list(tmp_path.rglob("m.*"))


# ---- Inception weights ------------------------------------------------------------------------


def test_inception_weights_offline_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MINFM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torch hub cache
    s = save_npz(tmp_path / "s.npz", images(4, 0))
    assert cli(["eval", "imagenet", s, "--ref", s]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "offline" in err[0] and "--inception" in err[0] and "MINFM_INCEPTION_WEIGHTS" in err[0]


def test_inception_weights_resolution_order(tmp_path, monkeypatch):
    from minfm_plugins.eval.inception import WEIGHTS_FILE, resolve_inception_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = tmp_path / "th" / "hub" / "checkpoints" / WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights() == cached
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv("MINFM_INCEPTION_WEIGHTS", str(env_file))
    assert resolve_inception_weights() == env_file
    flag = tmp_path / "flag.safetensors"
    flag.write_bytes(b"x")
    assert resolve_inception_weights(str(flag)) == flag
    with pytest.raises(MinfmError, match="no such file"):
        resolve_inception_weights(str(tmp_path / "missing.pth"))


def test_inception_weights_are_read_without_unpickling_code(tmp_path):
    from minfm_plugins.eval.inception import load_state_dict

    good = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.ones(2, 2)}, good)
    assert torch.equal(load_state_dict(good)["fc.weight"], torch.ones(2, 2))
    evil = tmp_path / "evil.pth"
    torch.save({"x": TinyExtractor()}, evil)  # an arbitrary object: refused by weights_only
    with pytest.raises(MinfmError, match="not a readable Inception state dict"):
        load_state_dict(evil)


def test_torch_fidelity_extractor_shapes(tmp_path):
    """The real network's wiring (random weights): skipped where torch-fidelity cannot be imported."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: F401
    except Exception as exc:  # not installed, or a torchvision that does not match torch
        pytest.skip(f"torch-fidelity unavailable: {exc}")
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from minfm_plugins.eval.inception import InceptionFeatures

    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        path = tmp_path / "w.pth"
        torch.save({}, path)
        ext = InceptionFeatures(path)
    feats = ext(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert feats["pool"].shape == (2, 2048) and feats["spatial"].shape == (2, 2023) and feats["logits"].shape == (2, 1008)
