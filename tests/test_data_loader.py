"""Pair loaders: the sampler's contract, the torch loader, DALI's CPU pipeline (and its GPU reader
where a GPU exists) delivering identical batches, resumption, sharding."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from nifti_inputs import nifti_folder

from gvsl_fast.data import demo_cohort, loader, make_loader, nifti
from gvsl_fast.data import preprocess as pp

DALI = loader.dali_error()
needs_dali = pytest.mark.skipif(DALI is not None, reason=str(DALI))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """anatomical.nii, MNI T1 and GM at 4 mm (33x41x25 -> 16x20x12 ... 49x58x47), float16."""
    root = tmp_path_factory.mktemp("loader")
    src = nifti_folder(root, broken=False)
    out = root / "pre"
    assert pp.main(["preprocess", str(src), str(out), "--spacing", "4", "4", "4",
                    "--dtype", "float16", "--no-progress"]) == 0
    return out


def volumes(data_dir):
    m = nifti.read_manifest(data_dir)
    return [np.load(data_dir / v["file"]).astype(np.float32) for v in m["volumes"]]


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_sampler_is_a_pure_function_of_step():
    shapes = [(20, 30, 40), (10, 12, 14), (50, 50, 50), (8, 40, 9)]
    s = loader.PairSampler(shapes, (16, 16, 16), 5, seed=3)
    p, q = s.plan(7), loader.PairSampler(shapes, (16, 16, 16), 5, seed=3).plan(7)
    for f in ("a", "b", "start_a", "start_b"):
        np.testing.assert_array_equal(getattr(p, f), getattr(q, f))
    assert not np.array_equal(s.plan(8).start_a, p.start_a)
    for step in range(50):
        p = s.plan(step)
        assert (p.a != p.b).all()
        for idx, start in ((p.a, p.start_a), (p.b, p.start_b)):
            room = np.asarray(shapes)[idx] - 16
            assert (start >= np.minimum(room, 0)).all() and (start <= np.maximum(room, 0)).all()


def test_sharding_by_rank():
    shapes = [(20, 20, 20)] * 8
    seen = {r: set() for r in range(2)}
    for r in range(2):
        s = loader.PairSampler(shapes, (8, 8, 8), 4, seed=0, rank=r, world_size=2)
        for step in range(30):
            p = s.plan(step)
            seen[r] |= set(p.a) | set(p.b)
    assert seen[0] == {0, 2, 4, 6} and seen[1] == {1, 3, 5, 7}
    # too few volumes to share out: every rank uses all, with its own stream
    s0 = loader.PairSampler(shapes[:3], (8, 8, 8), 4, seed=0, rank=0, world_size=2)
    s1 = loader.PairSampler(shapes[:3], (8, 8, 8), 4, seed=0, rank=1, world_size=2)
    assert not np.array_equal(s0.plan(0).start_a, s1.plan(0).start_a)
    with pytest.raises(ValueError, match="rank"):
        loader.PairSampler(shapes, (8, 8, 8), 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        loader.PairSampler(shapes[:1], (8, 8, 8), 4, seed=0)


def test_crop_pads_outside():
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    out = loader.crop(vol, (-2, 1, 3), (7, 3, 5))
    assert out.shape == (7, 3, 5)
    np.testing.assert_array_equal(out[2:6, :, :3], vol[:, 1:4, 3:6])
    assert not out[:2].any() and not out[6:].any() and not out[:, :, 3:].any()


@pytest.mark.parametrize("device", devices())
def test_torch_loader_batches(data_dir, device):
    vols = volumes(data_dir)
    patch = (24, 16, 20)                      # larger than anatomical's 16x20x12 at 4 mm: padded
    ld = make_loader(data_dir, patch=patch, batch_size=3, seed=5, kind="torch", device=device)
    assert ld.kind == "torch" and "torch" in ld.reason
    a, b = ld.batch(4)
    assert a.shape == b.shape == (3, 1, *patch) and a.dtype == torch.float32
    assert a.device.type == device
    p = ld.sampler.plan(4)
    for i in range(3):
        np.testing.assert_array_equal(a[i, 0].cpu().numpy(), loader.crop(vols[p.a[i]],
                                                                        p.start_a[i], patch))
        np.testing.assert_array_equal(b[i, 0].cpu().numpy(), loader.crop(vols[p.b[i]],
                                                                        p.start_b[i], patch))
    ld.close()


def test_iteration_resume_and_state(data_dir):
    ld = make_loader(data_dir, patch=(16, 16, 16), batch_size=2, seed=1, kind="torch")
    it = iter(ld)
    first = [next(it) for _ in range(5)]
    state = ld.state_dict()
    assert state["step"] == 5
    later = next(it)
    again = make_loader(data_dir, patch=(16, 16, 16), batch_size=2, seed=1, kind="torch")
    again.load_state_dict(state)
    resumed = next(iter(again))
    torch.testing.assert_close(resumed, later, rtol=0, atol=0)
    torch.testing.assert_close(again.batch(2), first[2], rtol=0, atol=0)
    other = make_loader(data_dir, patch=(16, 16, 16), batch_size=2, seed=2, kind="torch")
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    for x in (ld, again, other):
        x.close()


@needs_dali
@pytest.mark.parametrize("device", devices())
def test_dali_matches_torch(data_dir, device):
    """Same seed, same crop list: the DALI pipeline (CPU here, GPU reader on a GPU) and the torch
    loader deliver identical batches, sequentially, across a pipeline rebuild and at random."""
    kw = dict(patch=(24, 16, 20), batch_size=2, seed=11, device=device)
    dl = make_loader(data_dir, kind="dali", workers=1, **kw)
    dl.chunk = 3                                        # force rebuilds within the test
    tl = make_loader(data_dir, kind="torch", **kw)
    assert dl.kind == "dali" and dl.reason.startswith("asked for DALI")
    it = iter(dl)
    for step in range(5):
        got, want = next(it), tl.batch(step)
        assert got[0].device.type == device and got[0].dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for step in (17, 2, 3):
        torch.testing.assert_close(dl.batch(step), tl.batch(step), rtol=0, atol=0)
    dl.close()
    tl.close()


def test_auto_choice_and_errors(data_dir, tmp_path, monkeypatch):
    kind, reason = loader.choose_kind("auto", torch.device("cpu"))
    assert kind == "torch" and "cpu" in reason
    monkeypatch.setattr(loader, "dali_error", lambda: "nvidia.dali is not importable (test)")
    kind, reason = loader.choose_kind("auto", torch.device("cuda"))
    assert kind == "torch" and "not importable" in reason
    with pytest.raises(RuntimeError, match="--loader dali is not available"):
        loader.choose_kind("dali", torch.device("cpu"))
    monkeypatch.setattr(loader, "dali_error", lambda: None)
    assert loader.choose_kind("auto", torch.device("cuda"))[0] == "dali"
    with pytest.raises(ValueError, match="loader kind"):
        loader.choose_kind("fast", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="manifest"):
        make_loader(tmp_path, patch=(8, 8, 8), batch_size=1, seed=0)



@pytest.mark.parametrize("damage,says", [
    ("{ not json", "not valid JSON"),
    ('{"format": "%s", "volumes": [{"file": "a.npy"}]}', "a volume entry without a file name "
     "and a 3-D shape: {'file': 'a.npy'}"),
    ('[1, 2]', "format None, expected"),
])
def test_a_damaged_manifest_is_named(tmp_path, damage, says):
    """One ValueError naming the manifest, not a JSONDecodeError or KeyError without a path."""
    (tmp_path / nifti.MANIFEST).write_text(damage.replace("%s", nifti.FORMAT))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / nifti.MANIFEST}: {says}")):
        make_loader(tmp_path, patch=(8, 8, 8), batch_size=1, seed=0)


def test_a_dataset_of_one_volume_is_named(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((8, 8, 8), np.float32))
    nifti.write_manifest(tmp_path, [{"file": "a.npy", "shape": [8, 8, 8]}])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}: need at least 2 volumes to pair different images, got 1")):
        make_loader(tmp_path, patch=(8, 8, 8), batch_size=1, seed=0)

@pytest.mark.parametrize("damage,says", [
    (lambda f: np.save(f, np.zeros((8, 8), np.float32)), "shape (8, 8), but manifest.json says "
     "(8, 8, 8)"),
    (lambda f: np.save(f, np.zeros((8, 8, 7), np.float32)), "shape (8, 8, 7), but"),
    (lambda f: f.write_bytes(f.read_bytes()[:300]), "damaged or truncated .npy (mmap length"),
    (lambda f: f.write_bytes(b""), "damaged or truncated .npy"),
])
def test_a_damaged_volume_is_named(tmp_path, damage, says):
    """One ValueError naming the .npy, not a zip() or mmap error from the loader's threads."""
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.zeros((8, 8, 8), np.float32))
    nifti.write_manifest(tmp_path, [{"file": n, "shape": [8, 8, 8]} for n in ("a.npy", "b.npy")])
    damage(tmp_path / "b.npy")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'b.npy'}: {says}")):
        make_loader(tmp_path, patch=(8, 8, 8), batch_size=1, seed=0)


def test_demo_cohort_is_built_once(tmp_path):
    out = demo_cohort(tmp_path, n=3, spacing=6.0, seed=4)
    m = nifti.read_manifest(out)
    assert len(m["volumes"]) == 3 and m["cohort"]["seed"] == 4
    arrays = [np.load(out / v["file"]) for v in m["volumes"]]
    assert all(a.shape == (33, 39, 32) and a.min() >= 0 and a.max() == 1 for a in arrays)
    assert not np.allclose(arrays[0], arrays[1])             # different subjects
    stamp = (out / nifti.MANIFEST).stat().st_mtime_ns
    assert demo_cohort(tmp_path, n=3, spacing=6.0, seed=4) == out
    assert (out / nifti.MANIFEST).stat().st_mtime_ns == stamp
    again = demo_cohort(tmp_path / "other", n=3, spacing=6.0, seed=4)
    np.testing.assert_array_equal(np.load(again / m["volumes"][1]["file"]), arrays[1])
    with pytest.raises(ValueError, match="at least 2"):
        demo_cohort(tmp_path, n=1)


@pytest.mark.parametrize("other", ["finished", "incomplete"])
def test_demo_cohort_with_a_concurrent_build(tmp_path, monkeypatch, other):
    """Two processes (DDP ranks) build the same cohort: when the other one's folder appears
    while this one builds, a finished one is kept as it is (it may be being read) and an
    incomplete one is replaced; either way the result is a complete cohort, no error, and no
    temporary folder is left behind."""
    from gvsl_fast.data import demo

    out = demo.cohort_dir(tmp_path, 3, (6.0, 6.0, 6.0), 4)
    real_build = demo._build

    def build_while_the_other_finishes(tmp, *args):
        real_build(tmp, *args)
        if other == "finished":
            real_build(out, *args)  # the other process's complete cohort
        else:
            out.mkdir()
        (out / "the_other_build").write_bytes(b"")

    monkeypatch.setattr(demo, "_build", build_while_the_other_finishes)
    assert demo_cohort(tmp_path, n=3, spacing=6.0, seed=4) == out
    assert len(nifti.read_manifest(out)["volumes"]) == 3
    assert (out / "the_other_build").exists() == (other == "finished")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
