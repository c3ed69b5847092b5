"""`gvsl-fast preprocess` on real NIfTI files, resampling and normalization, prepare_dataset."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_inputs import BAD, GOOD, anatomical, nifti_folder

from gvsl_fast.data import nifti, prepare_dataset
from gvsl_fast.data import preprocess as pp

SPACING = ["--spacing", "4", "4", "4"]          # keeps the 1 mm MNI templates quick to convert


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    src = nifti_folder(root)
    out = root / "out"
    code = pp.main(["preprocess", str(src), str(out), *SPACING, "--no-progress"])
    return src, out, code


def test_converts_good_files_and_reports_bad_ones(converted, capsys):
    src, out, code = converted
    assert code == 1                                   # some files were skipped
    for rel in GOOD:
        assert (out / rel).is_file() and nifti.sidecar_path(out / rel).is_file()
    manifest = nifti.read_manifest(out)
    assert sorted(v["file"] for v in manifest["volumes"]) == sorted(GOOD)
    assert manifest["spacing"] == [4.0, 4.0, 4.0] and manifest["intensity"] == "mr"
    assert not list(out.rglob("*.tmp"))


def test_bad_files_named_in_summary(tmp_path, capsys):
    src = nifti_folder(tmp_path)
    code = pp.main(["preprocess", str(src), str(tmp_path / "o"), *SPACING, "--no-progress",
                    "--workers", "2"])
    cap = capsys.readouterr()
    assert code == 1
    assert "3 converted, 0 already done, 3 failed" in cap.out
    for name in BAD:
        assert name in cap.err
    assert "unreadable" in cap.err and "2-D" in cap.err and "4-D" in cap.err
    # a second run skips the finished files and still reports the broken ones
    code = pp.main(["preprocess", str(src), str(tmp_path / "o"), *SPACING, "--no-progress"])
    assert code == 1
    assert "0 converted, 3 already done, 3 failed" in capsys.readouterr().out


def test_sidecar_and_array_contents(converted):
    src, out, _ = converted
    arr = np.load(out / "anatomical.npy")
    assert arr.dtype == np.float32 and arr.flags.c_contiguous
    assert arr.min() == 0.0 and arr.max() == 1.0
    meta = json.loads((out / "anatomical.json").read_text())
    img = nib.load(anatomical())
    assert meta["original_shape"] == list(img.shape)
    np.testing.assert_allclose(meta["original_affine"], img.affine)
    assert meta["sha256"] == nifti.sha256(src / "anatomical.nii")
    assert Path(meta["source"]) == (src / "anatomical.nii").resolve()
    assert meta["spacing"] == [4.0, 4.0, 4.0] and meta["shape"] == list(arr.shape)
    np.testing.assert_allclose(nifti.voxel_sizes(np.array(meta["affine"])), [4, 4, 4], atol=1e-6)
    # 2 mm -> 4 mm halves each axis; canonical orientation: the affine's diagonal is positive
    assert list(arr.shape) == [round(s / 2) for s in img.shape]
    assert (np.diag(np.array(meta["affine"]))[:3] > 0).all()


def test_canonical_orientation_matches_nibabel(tmp_path):
    """A flipped, permuted copy of the image gives the same array as the original."""
    img = nib.load(anatomical())
    data = np.asarray(img.dataobj, dtype=np.float32)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1                       # voxel i -> n-1-i
    swapped = nib.Nifti1Image(data[::-1].copy(), img.affine @ flip)
    (tmp_path / "in").mkdir()
    nib.save(img, tmp_path / "in" / "a.nii")
    nib.save(swapped, tmp_path / "in" / "b.nii")
    assert pp.main(["preprocess", str(tmp_path / "in"), str(tmp_path / "out"),
                    "--spacing", "2", "2", "2", "--no-progress"]) == 0
    a, b = np.load(tmp_path / "out" / "a.npy"), np.load(tmp_path / "out" / "b.npy")
    np.testing.assert_array_equal(a, b)


def test_resample_keeps_world_coordinates():
    """Data linear in world coordinates stays that function of the new affine's coordinates."""
    affine = np.array([[0, 0, 2.5, -30], [1.5, 0, 0, 10], [0, 3.0, 0, 5], [0, 0, 0, 1]])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 16, 12)], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    coef = np.array([0.3, -0.2, 0.5])
    data = (world @ coef).astype(np.float32)
    out, new_affine = nifti.resample(data, affine, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(nifti.voxel_sizes(new_affine), [1, 1, 1], atol=1e-9)
    assert out.shape == (round(20 * 1.5), round(16 * 3), round(12 * 2.5))
    jdx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
    expect = (jdx @ new_affine[:3, :3].T + new_affine[:3, 3]) @ coef
    inner = (slice(2, -2),) * 3                          # the edges are clamped, not extrapolated
    np.testing.assert_allclose(out[inner], expect[inner], atol=1e-4)


def test_normalize_presets():
    hu = np.array([-2000.0, -1024.0, 0.0, 1024.0, 3000.0], np.float32)
    np.testing.assert_allclose(nifti.normalize(hu, "ct", hu_offset=1024),
                               [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(nifti.normalize(hu, "ct"), [0, 0, 0, 0.5, 1])
    np.testing.assert_allclose(nifti.normalize(np.array([2.0, 4.0, 6.0]), "mr"), [0, 0.5, 1])
    assert not nifti.normalize(np.full(4, 3.0), "mr").any()
    assert np.isfinite(nifti.normalize(np.array([np.nan, 1.0, 2.0]), "mr")).all()
    with pytest.raises(ValueError, match="intensity"):
        nifti.normalize(hu, "pet")


def test_ct_float16_and_parser(tmp_path, capsys):
    """The subcommand as the lead's CLI registers it, with the CT preset and float16 output."""
    (tmp_path / "in").mkdir()
    img = nib.load(anatomical())
    nib.save(img, tmp_path / "in" / "a.nii.gz")
    parser = argparse.ArgumentParser(prog="gvsl-fast")
    pp.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["preprocess", str(tmp_path / "in"), str(tmp_path / "out"),
                              "--intensity", "ct", "--hu-offset", "24", "--dtype", "float16",
                              "--workers", "2", "--spacing", "3", "3", "3"])
    assert args.func(args) == 0
    arr = np.load(tmp_path / "out" / "a.npy")
    raw = np.asarray(img.dataobj, np.float32)
    assert arr.dtype == np.float16 and 0 <= arr.min() and arr.max() <= (raw.max() + 24) / 2048
    assert "1 converted" in capsys.readouterr().out


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.load(anatomical()), src / "a.nii")
    real_save = np.save

    def dying_save(f, arr, **kw):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(src, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").rglob("*.npy")) and not list((tmp_path / "out").rglob(
        "*.tmp"))
    monkeypatch.setattr(np, "save", real_save)
    summary = pp.preprocess(src, tmp_path / "out", progress=False)
    assert summary.done == 1 and np.load(tmp_path / "out" / "a.npy").size > 0


def test_changed_source_is_converted_again(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = nib.load(anatomical())
    nib.save(img, src / "a.nii")
    assert pp.preprocess(src, tmp_path / "out", progress=False).done == 1
    data = np.asarray(img.dataobj, np.float32)
    nib.save(nib.Nifti1Image(data[::-1].copy(), img.affine), src / "a.nii")
    again = pp.preprocess(src, tmp_path / "out", progress=False)
    assert (again.done, again.skipped) == (1, 0)


def test_empty_and_missing_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert pp.main(["preprocess", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert f"no .nii or .nii.gz files found in {tmp_path / 'empty'}" in capsys.readouterr().err
    assert pp.main(["preprocess", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--spacing", "0", "1", "1"], ["--spacing", "inf", "1", "1"],
                                    ["--spacing", "1", "nan", "1"], ["--hu-offset", "nan"],
                                    ["--hu-offset=-inf"], ["--workers", "-3"]])
def test_bad_option_values_are_refused(tmp_path, capsys, option):
    """Refused by argparse, naming the option, before anything runs (not NaN volumes later)."""
    with pytest.raises(SystemExit) as exit_:
        pp.main(["preprocess", str(tmp_path), str(tmp_path / "o"), *option])
    name = option[0].split("=")[0]
    assert exit_.value.code == 2 and f"argument {name}:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_paths_that_are_not_folders(tmp_path, capsys):
    src = nifti_folder(tmp_path, broken=False)
    (tmp_path / "file").write_bytes(b"")
    assert pp.main(["preprocess", str(src), str(tmp_path / "file"), "--no-progress"]) == 2
    assert f"output folder {tmp_path / 'file'} is not a folder" in capsys.readouterr().err
    assert pp.main(["preprocess", str(tmp_path / "file"), str(tmp_path / "o")]) == 2
    assert f"input folder {tmp_path / 'file'} is not a folder" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match=f"data folder {tmp_path / 'file'} is not a"):
        prepare_dataset(tmp_path / "file", tmp_path / "cache")


def test_progress_bar_reports_files(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.load(anatomical()), src / "a.nii")
    assert pp.main(["preprocess", str(src), str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "1/1" in err and "file" in err and "MB/s" in err


# ---- prepare_dataset -------------------------------------------------------------------------


def test_prepare_dataset_sources(tmp_path, converted):
    _, out, _ = converted
    assert prepare_dataset(out, tmp_path / "cache", spacing=(4, 4, 4)) == out  # as it is
    src = nifti_folder(tmp_path / "raw", broken=False)
    got = prepare_dataset(src, tmp_path / "cache", spacing=(4, 4, 4))
    assert got.parent == tmp_path / "cache"
    assert len(nifti.read_manifest(got)["volumes"]) == 3
    assert prepare_dataset(src, tmp_path / "cache", spacing=(4, 4, 4)) == got
    demo_dir = prepare_dataset(None, tmp_path / "cache", spacing=(6, 6, 6))
    vols = nifti.read_manifest(demo_dir)["volumes"]
    assert len(vols) == 8 and vols[0]["shape"] == [33, 39, 32]


def test_prepare_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no images in {tmp_path / 'empty'}"):
        prepare_dataset(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "cache")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nii").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no usable image"):
        prepare_dataset(tmp_path / "bad", tmp_path / "cache")


def test_prepare_dataset_of_one_image_names_the_folder(tmp_path):
    """Not the cache folder, which the loader's error would name."""
    (tmp_path / "one").mkdir()
    nib.save(nib.load(anatomical()), tmp_path / "one" / "a.nii")
    with pytest.raises(ValueError, match=f"only 1 usable image in {tmp_path / 'one'}, need at "
                       "least 2"):
        prepare_dataset(tmp_path / "one", tmp_path / "cache", spacing=(4, 4, 4))


@pytest.mark.parametrize("spacing,intensity", [((2, 2, 2), "mr"), ((4, 4, 4), "ct")])
def test_prepare_dataset_says_a_preprocessed_folder_ignores_other_settings(
        tmp_path, converted, spacing, intensity):
    _, out, _ = converted                                  # 4 mm, mr
    with pytest.warns(RuntimeWarning, match=re.escape(
            f"{out} was preprocessed with spacing [4.0, 4.0, 4.0] and intensity 'mr'; the "
            f"requested spacing {[float(s) for s in spacing]} and intensity '{intensity}' are "
            "not applied")) as w:
        assert prepare_dataset(out, tmp_path / "cache", spacing=spacing,
                               intensity=intensity) == out
    assert len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_dataset(out, tmp_path / "cache", spacing=(4, 4, 4), intensity="mr")


@pytest.mark.parametrize("progress", [True, False])
def test_prepare_dataset_progress_bar(tmp_path, capsys, progress):
    src = nifti_folder(tmp_path, broken=False)
    prepare_dataset(src, tmp_path / "cache", spacing=(4, 4, 4), progress=progress)
    assert ("preprocess" in capsys.readouterr().err) == progress


def test_prepare_dataset_names_the_files_it_leaves_out(tmp_path):
    src = nifti_folder(tmp_path)
    for _ in range(2):  # converting, then with the good files already done
        with pytest.warns(RuntimeWarning, match=f"3 of 6 NIfTI files in {src} are left out") as w:
            got = prepare_dataset(src, tmp_path / "cache", spacing=(4, 4, 4))
        assert all(name in str(w[0].message) for name in BAD)
        assert len(nifti.read_manifest(got)["volumes"]) == 3


def test_singleton_fourth_axis_and_duplicate_names(tmp_path, capsys):
    """(X, Y, Z, 1) is a 3-D volume; a.nii beside a.nii.gz would write one output twice."""
    src = tmp_path / "in"
    src.mkdir()
    data = np.asarray(nib.load(anatomical()).dataobj, np.float32)
    nib.save(nib.Nifti1Image(data[..., None], np.eye(4)), src / "a.nii")
    nib.save(nib.Nifti1Image(data, np.eye(4)), src / "a.nii.gz")
    assert pp.main(["preprocess", str(src), str(tmp_path / "o"), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert "1 converted, 0 already done, 1 failed" in cap.out
    assert "a.nii.gz: same output name as" in cap.err
    assert np.load(tmp_path / "o" / "a.npy").shape == data.shape
