"""The training loaders (niconv.datasets) on real preprocessed cohorts: the index, tf.data and PyTorch batches."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from helpers import preprocessed_cohort
from niconv import datasets
from niconv.datasets import load_sample, read_index, tf_dataset, torch_loader
from niconv.errors import DatasetError, NiconvError

# helpers.LOADER_SPLIT puts sct_t2s in val and nib_small in test; the other three images train
TRAIN = ["dipy_aniso_vox", "nib_anatomical", "sct_fmri_tsnr"]


@pytest.fixture(scope="module")
def npy_root(tmp_path_factory):
    """A real preprocessed cohort, ``format: npy`` (channels_first, (1, 20, 20, 16)), with its index."""
    out = preprocessed_cohort(tmp_path_factory.mktemp("npy"))
    return out


@pytest.fixture(scope="module")
def npz_root(tmp_path_factory):
    """The same images as ``format: npz`` and ``layout: channels_last`` ((20, 20, 16, 1))."""
    out = preprocessed_cohort(tmp_path_factory.mktemp("npz"), format="npz", layout="channels_last")
    return out


def on_disk(root, subject):
    """The image and label arrays of ``subject`` as written, by plain np.load."""
    index = read_index(root)
    sample = next(s for s in index.samples if s.subject == subject)
    if sample.format == "npz":
        with np.load(index.file(sample.image)) as z:
            return z["data"], z["label"]
    return np.load(index.file(sample.image)), np.load(index.file(sample.label))


def subjects(index, split):
    return [s.subject for s in index.select(split)]


def where_inside(volume, patch):
    """Every first voxel (x, y, z) at which ``patch`` equals a window of ``volume`` (both channels_first)."""
    windows = sliding_window_view(volume, patch.shape)[0]  # (nx, ny, nz, C, px, py, pz)
    return [tuple(map(int, c)) for c in np.argwhere((windows == patch).all(axis=(3, 4, 5, 6)))]


# ------------------------------------------------------------------------------ the index


def test_read_index_gives_the_samples_and_splits_as_written(npy_root):
    index = read_index(npy_root / "dataset.json")
    assert read_index(npy_root) == index  # the folder holding it reads the same
    assert index.path == npy_root / "dataset.json" and index.layout == "channels_first" and index.label == "label"
    assert [s.id for s in index.samples] == sorted(s.id for s in index.samples)
    assert subjects(index, "train") == [s for s in (x.subject for x in index.samples) if s in TRAIN]
    assert subjects(index, "val") == ["sct_t2s"] and subjects(index, "test") == ["nib_small"]
    assert len(index.select(None)) == 5
    sample = index.select("val")[0]
    assert (sample.image, sample.label, sample.format) == ("sct_t2s.npy", "sct_t2s_label.npy", "npy")
    assert sample.shape == sample.label_shape == (1, 20, 20, 16)
    assert (sample.dtype, sample.label_dtype) == ("float32", "uint8")
    image, label = load_sample(index, sample)
    np.testing.assert_array_equal(image, np.load(npy_root / "sct_t2s.npy"))
    np.testing.assert_array_equal(label, np.load(npy_root / "sct_t2s_label.npy"))
    assert sorted(np.unique(label).tolist()) == list(sample.label_values)


def test_folds_split_the_training_samples_into_train_and_val(copy_of):
    root = copy_of()

    def folds(d):
        d["splits"] = {"file": "splits.json", "by": "subject", "seed": 0, "val": None, "test": 0.2, "folds": 2}
        for i, s in enumerate(x for x in d["samples"] if x["split"] != "test"):
            s["split"], s["fold"] = "train", i % 2
    rewrite(root / "dataset.json", folds)
    index = read_index(root)
    fold0 = {s.subject for s in index.samples if s.fold == 0}
    fold1 = {s.subject for s in index.samples if s.fold == 1}
    assert len(fold0) == 2 and len(fold1) == 2
    assert {s.subject for s in index.select("val", fold=0)} == fold0
    assert {s.subject for s in index.select("train", fold=0)} == fold1
    assert [s.subject for s in index.select("test", fold=1)] == ["nib_small"]
    [(x, _)] = list(tf_dataset(index, "val", fold=1, batch_size=2))
    assert x.shape[0] == 2
    with pytest.raises(DatasetError, match=r"fold=2 asked for; the index has folds 0 to 1"):
        torch_loader(index, "train", fold=2)


def test_importing_the_loaders_imports_no_framework():
    code = "import sys, niconv.datasets; print('tensorflow' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------ whole volumes


def test_tf_batches_equal_the_arrays_on_disk_and_keep_to_the_split(npy_root):
    index = read_index(npy_root)
    batches = list(tf_dataset(index, "train", batch_size=2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 1, 20, 20, 16), (1, 1, 20, 20, 16)]
    assert [tuple(y.shape) for _, y in batches] == [(2, 1, 20, 20, 16), (1, 1, 20, 20, 16)]
    assert {x.dtype.name for x, _ in batches} == {"float32"} and {y.dtype.name for _, y in batches} == {"uint8"}
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    for i, subject in enumerate(subjects(index, "train")):
        image, label = on_disk(npy_root, subject)
        np.testing.assert_array_equal(images[i], image)
        np.testing.assert_array_equal(labels[i], label)
    [(x, y)] = list(tf_dataset(npy_root / "dataset.json", "val", batch_size=4))
    np.testing.assert_array_equal(x.numpy()[0], on_disk(npy_root, "sct_t2s")[0])
    assert x.shape[0] == 1


def test_tf_shuffle_serves_each_training_sample_once_per_epoch_and_is_seeded(npy_root):
    index = read_index(npy_root)
    train = {s: on_disk(npy_root, s)[0].tobytes() for s in subjects(index, "train")}

    def epoch(ds):
        return [next(s for s, b in train.items() if b == x.tobytes()) for batch, _ in ds for x in batch.numpy()]

    ds = tf_dataset(index, "train", batch_size=2, shuffle=True, seed=3)
    first, second = epoch(ds), epoch(ds)
    assert sorted(first) == sorted(second) == sorted(train)
    assert epoch(tf_dataset(index, "train", batch_size=2, shuffle=True, seed=3)) == first


def test_torch_batches_equal_the_arrays_on_disk_and_keep_to_the_split(npy_root):
    import torch

    index = read_index(npy_root)
    batches = list(torch_loader(index, "train", batch_size=2, num_workers=2))
    assert [(tuple(x.shape), tuple(y.shape)) for x, y in batches] == [
        ((2, 1, 20, 20, 16), (2, 1, 20, 20, 16)), ((1, 1, 20, 20, 16), (1, 1, 20, 20, 16))]
    assert {x.dtype for x, _ in batches} == {torch.float32} and {y.dtype for _, y in batches} == {torch.uint8}
    images = torch.cat([x for x, _ in batches]).numpy()
    labels = torch.cat([y for _, y in batches]).numpy()
    for i, subject in enumerate(subjects(index, "train")):
        image, label = on_disk(npy_root, subject)
        np.testing.assert_array_equal(images[i], image)
        np.testing.assert_array_equal(labels[i], label)
    test = datasets.TorchDataset(npy_root, "test")
    assert len(test) == 1 and isinstance(test, torch.utils.data.Dataset)
    assert type(pickle.loads(pickle.dumps(test))) is datasets.TorchDataset  # workers started by spawn get it by name
    x, y = test[0]
    np.testing.assert_array_equal(x.numpy(), on_disk(npy_root, "nib_small")[0])
    np.testing.assert_array_equal(y.numpy(), on_disk(npy_root, "nib_small")[1])


def test_npz_samples_channels_last_batch_equal_to_np_load(npz_root):
    import torch

    index = read_index(npz_root)
    assert index.layout == "channels_last" and {s.format for s in index.samples} == {"npz"}
    [(x, y)] = list(tf_dataset(index, "train", batch_size=3))
    [(tx, ty)] = list(torch_loader(index, "train", batch_size=3, num_workers=0))
    assert tuple(x.shape) == tuple(tx.shape) == (3, 20, 20, 16, 1) and tuple(y.shape) == (3, 20, 20, 16, 1)
    assert tx.dtype == torch.float32 and ty.dtype == torch.uint8 and x.dtype.name == "float32"
    for i, subject in enumerate(subjects(index, "train")):
        image, label = on_disk(npz_root, subject)
        np.testing.assert_array_equal(x.numpy()[i], image)
        np.testing.assert_array_equal(tx.numpy()[i], image)
        np.testing.assert_array_equal(y.numpy()[i], label)
        np.testing.assert_array_equal(ty.numpy()[i], label)


# ------------------------------------------------------------------------------ patches


def check_patches(root, pairs, patch):
    """Every (subject, image patch, label patch) lies inside the subject's volume, the label at the same voxels;
    returns the first voxels found."""
    corners = []
    for subject, x, y in pairs:
        image, label = on_disk(root, subject)
        assert x.shape == y.shape == (1, *patch)
        found = [c for c in where_inside(image, x) if np.array_equal(where_inside_label(label, c, patch), y)]
        assert found, f"a patch of {subject} is not a window of its volume with the label at the same voxels"
        corners.append((subject, found[0]))
    return corners


def where_inside_label(label, corner, patch):
    x, y, z = corner
    return label[:, x:x + patch[0], y:y + patch[1], z:z + patch[2]]


def test_tf_patches_lie_inside_the_volume_with_the_label_at_the_same_voxels(npy_root):
    index = read_index(npy_root)
    names = subjects(index, "train")
    ds = tf_dataset(index, "train", batch_size=1, patch_size=(8, 6, 5), seed=1)
    pairs = [(names[i % 3], x.numpy()[0], y.numpy()[0]) for i, (x, y) in enumerate(list(ds) + list(ds))]
    corners = check_patches(npy_root, pairs, (8, 6, 5))
    assert len(set(corners)) > 3  # a new position each epoch (and sample)
    again = [x.numpy() for x, _ in tf_dataset(index, "train", batch_size=1, patch_size=(8, 6, 5), seed=1)]
    assert all(np.array_equal(a, p[1][None]) for a, p in zip(again, pairs))  # the seed gives the same patches


def test_torch_patches_lie_inside_the_volume_with_the_label_at_the_same_voxels(npy_root):
    index = read_index(npy_root)
    names = subjects(index, "train")
    loader = torch_loader(index, "train", batch_size=3, patch_size=7, num_workers=2, seed=5)
    pairs = [(names[i], x.numpy(), y.numpy()) for _ in range(3) for xb, yb in loader
             for i, (x, y) in enumerate(zip(xb, yb))]
    assert len(set(check_patches(npy_root, pairs, (7, 7, 7)))) > 3


def test_channels_last_patches_cut_the_spatial_axes(npz_root):
    index = read_index(npz_root)
    names = subjects(index, "train")
    [(x, y)] = list(tf_dataset(index, "train", batch_size=3, patch_size=(4, 5, 6)))
    assert tuple(x.shape) == tuple(y.shape) == (3, 4, 5, 6, 1)
    pairs = [(n, np.moveaxis(x.numpy()[i], -1, 0), np.moveaxis(y.numpy()[i], -1, 0)) for i, n in enumerate(names)]
    for subject, image, label in pairs:  # compare channels_first views of the channels_last files
        full, full_label = (np.moveaxis(a, -1, 0) for a in on_disk(npz_root, subject))
        assert any(np.array_equal(where_inside_label(full_label, c, (4, 5, 6)), label)
                   for c in where_inside(full, image))


# ------------------------------------------------------------------------------ errors


@pytest.fixture
def copy_of(npy_root, tmp_path):
    """A copy of the npy cohort's output root (index and samples), to damage."""
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(npy_root, dst)
        return dst
    return make


def rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_missing_or_damaged_index_is_a_clear_error(copy_of):
    root = copy_of()
    index_path = root / "dataset.json"
    text = index_path.read_text()
    with pytest.raises(DatasetError, match=r"copy/nowhere: dataset index not found \(a to: preprocess run "
                                           r"writes dataset\.json"):
        read_index(root / "nowhere")
    index_path.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"dataset\.json: the dataset index is damaged: not valid JSON "
                                           r"\(.* at line \d+, column \d+\)"):
        read_index(root)
    index_path.write_text('["a list"]')
    with pytest.raises(DatasetError, match=r"not a niconv dataset index: expected an object with format "
                                           r"'niconv-dataset', found a JSON list"):
        read_index(index_path)
    index_path.write_text(text)
    rewrite(index_path, lambda d: d.update(version=2))
    with pytest.raises(DatasetError, match=r"dataset index version 2: this niconv reads version 1"):
        read_index(root)
    index_path.write_text(text)

    def damage(d):
        d["samples"][1]["shape"] = "big"
        del d["samples"][2]["image"]
        d["samples"][3]["dtype"] = "floaty"
        d["samples"][4]["label_dtype"] = None
    rewrite(index_path, damage)
    with pytest.raises(DatasetError) as caught:
        read_index(root)
    assert str(caught.value).splitlines() == [
        f"{index_path}: the dataset index is damaged, 4 problem(s):",
        "  samples[1].shape: expected a list of numbers, found the string 'big'",
        "  samples[2].image: required key is missing",
        "  samples[3].dtype: expected a NumPy dtype name such as 'float32', found 'floaty'",
        "  samples[4]: a sample with a label needs label_shape and label_dtype"]
    assert isinstance(caught.value, NiconvError)


def test_a_missing_or_stale_sample_file_is_named(copy_of):
    root = copy_of()
    (root / "sct_t2s_label.npy").unlink()
    with pytest.raises(DatasetError, match=r"sct_t2s_label\.npy: sample '[0-9a-f]+' of the dataset index "
                                           r".*dataset\.json is missing"):
        read_index(root)
    np.save(root / "sct_t2s_label.npy", np.zeros((1, 20, 20, 8), np.uint8))  # not what the index says
    index = read_index(root)
    with pytest.raises(DatasetError, match=r"sct_t2s_label\.npy: the array is \[1, 20, 20, 8\] uint8, the index "
                                           r".*dataset\.json says \[1, 20, 20, 16\] uint8 \(the index is stale"):
        datasets.TorchDataset(index, "val")[0]
    # read in a worker, the message comes through the framework's own error
    import tensorflow as tf
    with pytest.raises(tf.errors.OpError, match=r"sct_t2s_label\.npy: the array is \[1, 20, 20, 8\] uint8"):
        list(tf_dataset(index, "val"))
    with pytest.raises(RuntimeError, match=r"(?s)Caught DatasetError in DataLoader worker.*sct_t2s_label\.npy: the "
                                           r"array is \[1, 20, 20, 8\] uint8"):
        list(torch_loader(index, "val", num_workers=1))
    (root / "sct_t2s.npy").write_bytes((root / "sct_t2s.npy").read_bytes()[:1000])  # cut short
    with pytest.raises(DatasetError, match=r"sct_t2s\.npy: not a readable \.npy file: mmap length is greater "
                                           r"than file size"):
        load_sample(index, index.select("val")[0])
    (root / "sct_t2s.npy").write_bytes(b"not an array at all")
    with pytest.raises(DatasetError, match=r"sct_t2s\.npy: not a readable \.npy file: the magic string is not "
                                           r"correct"):
        load_sample(index, index.select("val")[0])
    rewrite(root / "dataset.json", lambda d: d["samples"][0].update(image="../outside.npy"))
    with pytest.raises(DatasetError, match=r"path '\.\./outside\.npy' must be relative to the index's folder"):
        read_index(root)


def test_what_cannot_be_batched_is_refused_before_any_read(copy_of):
    root = copy_of()
    index = read_index(root)
    with pytest.raises(DatasetError, match=r"patch_size \[32, 8, 8\] does not fit in sample '[0-9a-f]+' of "
                                           r"spatial shape \[20, 20, 16\]"):
        tf_dataset(index, "train", patch_size=(32, 8, 8))
    with pytest.raises(DatasetError, match=r"no sample in split 'validation'; the index has samples in "
                                           r"\['test', 'train', 'val'\]"):
        torch_loader(index, "validation")
    with pytest.raises(DatasetError, match=r"fold=0 asked for, but the index has no folds"):
        tf_dataset(index, "train", fold=0)
    first = index.select("train")[0].id

    def reshape(d):
        s = next(s for s in d["samples"] if s["id"] == first)
        s["shape"] = s["label_shape"] = [1, 20, 20, 8]
    rewrite(root / "dataset.json", reshape)
    with pytest.raises(DatasetError, match=r"samples of shape \[1, 20, 20, (8|16)\] and \[1, 20, 20, (16|8)\] cannot "
                                           r"share a batch: preprocess to one shape \(crop_pad\), set patch_size"):
        torch_loader(root, "train", batch_size=2)
    assert len(torch_loader(root, "train", batch_size=1)) == 3  # one at a time, shapes may differ
    rewrite(root / "dataset.json", lambda d: [s.update(label=None, label_shape=None, label_dtype=None)
                                              for s in d["samples"] if s["id"] == first])
    with pytest.raises(DatasetError, match=r"sample '[0-9a-f]+' has no label map while other samples of split "
                                           r"'train' have one: batches need both or neither"):
        tf_dataset(root, "train")
    rewrite(root / "dataset.json", lambda d: [s.update(format="nifti") for s in d["samples"]])
    with pytest.raises(DatasetError, match=r"is nifti: the loaders read npy or npz outputs \(convert with "
                                           r"format: npy\)"):
        tf_dataset(root, "val")
