"""Training-time loaders over a preprocessed cohort's index (``dataset.json``).

:func:`read_index` reads and checks the index a ``to: preprocess`` run writes in
its output root; :func:`tf_dataset` gives a ``tf.data.Dataset`` of ``(image,
label)`` batches and :class:`TorchDataset` / :func:`torch_loader` the same
samples for PyTorch. ``.npy`` samples are read by memory map (only the voxels of
a patch are read from disk), ``.npz`` samples with :func:`numpy.load`; reads run
in parallel (``tf.data`` parallel map, ``DataLoader`` workers).

TensorFlow and PyTorch are imported only by the functions that need them, so
niconv itself never needs them (``pip install niconv[tensorflow]`` or
``niconv[torch]``).

Shapes (``layout`` of the index; ``B`` batch, ``C`` channels, ``X, Y, Z`` the
volume or the patch):

==================  ======================  ======================
                    channels_first          channels_last
==================  ======================  ======================
one sample image    ``(C, X, Y, Z)``        ``(X, Y, Z, C)``
one sample label    ``(1, X, Y, Z)``        ``(X, Y, Z, 1)``
a batch             ``(B, C, X, Y, Z)``     ``(B, X, Y, Z, C)``
==================  ======================  ======================

Images and labels keep the dtype the index gives (float32 images and an
unsigned integer label map by default).
"""
from __future__ import annotations

import json
import numbers
import posixpath
import zipfile
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import DatasetError
from .schema import problems

FORMAT = "niconv-dataset"
VERSION = 1
INDEX_NAME = "dataset.json"
_READABLE = ("npy", "npz")  # sample formats the loaders read (nifti is for viewing)


class _Record(BaseModel):
    # frozen and picklable (sent to DataLoader workers); keys a newer writer adds are ignored
    model_config = ConfigDict(extra="ignore", frozen=True)


class Sample(_Record):
    """One sample of the index, as written (paths relative to the index's folder, ``/`` separated)."""

    id: str
    subject: str
    split: str
    fold: Optional[int] = None
    image: str
    label: Optional[str] = None
    format: Literal["npy", "npz", "nifti"]
    shape: tuple[int, ...]
    dtype: str
    label_shape: Optional[tuple[int, ...]] = None
    label_dtype: Optional[str] = None
    label_values: Optional[tuple[Union[int, float], ...]] = None
    channels: Optional[tuple[str, ...]] = None
    spacing: Optional[tuple[float, ...]] = None
    affine: Optional[tuple[tuple[float, ...], ...]] = None

    @field_validator("dtype", "label_dtype")
    @classmethod
    def _dtype(cls, v):
        try:
            np.dtype(v)
        except TypeError:
            raise ValueError(f"expected a NumPy dtype name such as 'float32', found {v!r}") from None
        return v

    @model_validator(mode="after")
    def _label_described(self):
        if self.label is not None and (self.label_shape is None or self.label_dtype is None):
            raise ValueError("a sample with a label needs label_shape and label_dtype")
        return self


class Index(_Record):
    """A dataset index: the fields of ``dataset.json`` and ``path``, the file it was read from.

    Attributes
    ----------
    path : pathlib.Path
        The ``dataset.json`` read; sample paths are relative to its folder.
    layout : {"channels_first", "channels_last"}
    channels : tuple of str or None
        The cohort's channel names when every sample shares them.
    label : str or None
        The label channel's name; None when no sample has a label map.
    splits, statistics : dict or None
        As written (``splits.json``'s settings; cohort statistics).
    samples : tuple of Sample
        Sorted by id.
    """

    format: Literal["niconv-dataset"]
    version: int
    niconv: Optional[str] = None
    layout: Literal["channels_first", "channels_last"]
    channels: Optional[tuple[str, ...]] = None
    label: Optional[str] = None
    preprocessing: Optional[list[Any]] = None
    splits: Optional[dict[str, Any]] = None
    statistics: Optional[dict[str, Any]] = None
    samples: tuple[Sample, ...]
    path: Path = Path(INDEX_NAME)

    def file(self, relative: str) -> Path:
        """The path of a sample file named relative to the index's folder (``image``, ``label``)."""
        return self.path.parent / relative

    def select(self, split: str | None = "train", fold: int | None = None) -> tuple[Sample, ...]:
        """The samples of one split, in index order.

        Parameters
        ----------
        split : {"train", "val", "test"} or None
            None: every sample.
        fold : int, optional
            With an index split in folds (``splits.folds``): ``split="train"`` gives the
            training samples outside ``fold``, ``split="val"`` those in it, ``"test"`` the
            held-out test samples.

        Raises
        ------
        DatasetError
            If the split holds no sample, or ``fold`` is given for an index without folds
            or is out of range.
        """
        folds = (self.splits or {}).get("folds")
        if fold is None:
            chosen = tuple(s for s in self.samples if split is None or s.split == split)
        else:
            if isinstance(fold, bool) or not isinstance(fold, numbers.Integral):  # "1" from a command line
                found = f"{fold!r} (text)" if isinstance(fold, str) else f"{fold!r} (a {type(fold).__name__})"
                raise DatasetError(self.path, f"fold: expected a whole number from 0 to "
                                              f"{folds - 1 if folds else 'the number of folds - 1'}, found {found}")
            if not folds:
                raise DatasetError(self.path, f"fold={fold} asked for, but the index has no folds "
                                              f"(splits.folds is {folds!r}; set dataset.split.folds)")
            if not 0 <= fold < folds:
                raise DatasetError(self.path, f"fold={fold} asked for; the index has folds 0 to {folds - 1}")
            if split == "val":
                chosen = tuple(s for s in self.samples if s.split == "train" and s.fold == fold)
            elif split == "train":
                chosen = tuple(s for s in self.samples if s.split == "train" and s.fold != fold)
            else:
                chosen = tuple(s for s in self.samples if split is None or s.split == split)
        if not chosen:
            present = sorted({s.split for s in self.samples})
            hint = (f"; the index is split in {folds} folds: pass fold=0 to {folds - 1} for a fold's validation "
                    "samples" if folds and fold is None and split == "val" else "")
            raise DatasetError(self.path, f"no sample in split {split!r}" + ("" if fold is None else f", fold {fold}")
                                          + f"; the index has samples in {present}{hint}")
        return chosen


def read_index(path: str | Path) -> Index:
    """Read and check a dataset index.

    Parameters
    ----------
    path : str or path-like
        A ``dataset.json``, or the folder holding one (a preprocess run's output root).

    Returns
    -------
    Index
        The validated index; every sample file it names exists.

    Raises
    ------
    DatasetError
        Naming the file and what is wrong: the index is missing or not valid JSON, is not
        a niconv dataset index, has another ``version`` than this niconv reads, has fields
        of the wrong kind (each listed by key path, e.g. ``samples[2].shape``), a sample
        path that is absolute or leaves the index's folder, or a sample file that is missing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(path, "dataset index not found (a to: preprocess run writes dataset.json "
                                 "in its output root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot read the dataset index: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"the dataset index is damaged: not valid JSON ({exc.msg} at line {exc.lineno}, "
                                 f"column {exc.colno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        kind = f"format {data.get('format')!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise DatasetError(path, f"not a niconv dataset index: expected an object with format {FORMAT!r}, "
                                 f"found {kind}")
    if data.get("version") != VERSION:
        raise DatasetError(path, f"dataset index version {data.get('version')!r}: this niconv reads version "
                                 f"{VERSION} (rerun the preprocess with this niconv, or use the niconv that wrote it)")
    try:
        index = Index.model_validate({**data, "path": path})
    except ValidationError as exc:
        found = problems(exc, Index, data)
        lines = "\n".join(f"  {k}: {m}" if k else f"  {m}" for k, m in found)
        raise DatasetError(path, f"the dataset index is damaged, {len(found)} problem(s):\n{lines}") from None
    for sample in index.samples:
        for rel in filter(None, (sample.image, sample.label)):
            if posixpath.isabs(rel) or ".." in rel.split("/") or "\\" in rel:
                raise DatasetError(path, f"sample {sample.id!r}: path {rel!r} must be relative to the index's "
                                         f"folder, '/' separated, without '..'")
            if not index.file(rel).is_file():
                raise DatasetError(index.file(rel), f"sample {sample.id!r} of the dataset index {path} is missing")
    return index


# ------------------------------------------------------------------------------ reading samples


def _spatial_axes(layout: str) -> slice:
    return slice(1, 4) if layout == "channels_first" else slice(0, 3)


def patch_slices(layout: str, corner: Sequence[int], patch_size: Sequence[int]) -> tuple[slice, ...]:
    """Index of a patch in a sample array of ``layout``: all channels, ``patch_size`` voxels from ``corner``.

    Parameters
    ----------
    layout : {"channels_first", "channels_last"}
    corner, patch_size : sequence of 3 int
        First voxel and size of the patch along X, Y, Z.

    Returns
    -------
    tuple of slice
        For ``array[...]`` of shape ``(C, X, Y, Z)`` or ``(X, Y, Z, C)``; the same for the label.
    """
    spatial = tuple(slice(int(c), int(c) + int(p)) for c, p in zip(corner, patch_size))
    return (slice(None), *spatial) if layout == "channels_first" else (*spatial, slice(None))


def random_corner(shape: Sequence[int], layout: str, patch_size: Sequence[int], rng: np.random.Generator):
    """A uniformly drawn first voxel of a ``patch_size`` patch that lies inside a sample of ``shape``."""
    return tuple(int(rng.integers(0, n - p + 1)) for n, p in zip(shape[_spatial_axes(layout)], patch_size))


def load_sample(index: Index, sample: Sample, corner: Sequence[int] | None = None,
                patch_size: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one sample (or a patch of it) into memory.

    Parameters
    ----------
    index : Index
    sample : Sample
        One of ``index.samples``; format ``npy`` (read by memory map: only the patch's
        voxels are read) or ``npz`` (read whole with :func:`numpy.load`).
    corner, patch_size : sequence of 3 int, optional
        A patch (see :func:`patch_slices`); the whole volume when None.

    Returns
    -------
    image : numpy.ndarray
        ``sample.dtype``, C-contiguous, shape ``sample.shape`` (or the patch's).
    label : numpy.ndarray or None
        ``sample.label_dtype``, the same voxels; None when the sample has no label map.

    Raises
    ------
    DatasetError
        If a file holds another shape or dtype than the index says (the index is stale),
        an ``.npz`` lacks a member, the sample's format is ``nifti``, or a file cannot be read.
    """
    _readable(index, sample)
    where = patch_slices(index.layout, corner, patch_size) if patch_size is not None else ()
    # in memory, writable, C order: a memory map is copied (only the patch's pages are read);
    # an .npz member is already in memory, so only a patch of it is copied
    own = np.array if sample.format == "npy" else np.ascontiguousarray
    image = own(_array(index, sample.image, "data", sample.shape, sample.dtype, sample.format)[where])
    if sample.label is None:
        return image, None
    label = _array(index, sample.label, "label", sample.label_shape, sample.label_dtype, sample.format)
    return image, own(label[where])


def _readable(index: Index, sample: Sample) -> None:
    if sample.format not in _READABLE:
        raise DatasetError(index.file(sample.image), f"sample {sample.id!r} is {sample.format}: the loaders read "
                                                     f"npy or npz outputs (convert with format: npy)")


def _array(index: Index, rel: str, member: str, shape, dtype: str, fmt: str) -> np.ndarray:
    """One array of a sample, checked against the index: an ``.npy`` by memory map, or a member of an ``.npz``."""
    path = index.file(rel)
    what = "the array" if fmt == "npy" else f"member {member!r}"
    try:
        if fmt == "npy":
            arr = np.lib.format.open_memmap(path, mode="r")  # np.load would try other formats (pickle)
        else:
            with np.load(path, allow_pickle=False) as z:
                if member not in z.files:
                    raise DatasetError(path, f"the .npz has no {member!r} member (found {sorted(z.files)}), "
                                             f"the index {index.path} says it has")
                arr = z[member]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(path, f"not a readable .{fmt} file: {exc}") from None
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise DatasetError(path, f"{what} is {list(arr.shape)} {arr.dtype}, the index {index.path} says "
                                 f"{list(shape)} {dtype} (the index is stale: rerun the preprocess)")
    return arr


# ------------------------------------------------------------------------------ what a loader serves


class _Plan(BaseModel):
    """The samples a loader serves and the shapes and dtypes of what it yields (None: varies)."""

    model_config = ConfigDict(frozen=True)
    index: Index
    samples: tuple[Sample, ...]
    patch_size: Optional[tuple[int, int, int]]
    image_shape: tuple[Optional[int], ...]
    image_dtype: str
    label_shape: Optional[tuple[Optional[int], ...]]
    label_dtype: Optional[str]


def _plan(index: Index | str | Path, split: str | None, fold: int | None, patch_size, batch_size: int) -> _Plan:
    index = index if isinstance(index, Index) else read_index(index)
    samples = index.select(split, fold)
    for s in samples:
        _readable(index, s)
    if patch_size is not None:
        patch_size = (int(patch_size),) * 3 if np.ndim(patch_size) == 0 else tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise DatasetError("patch_size", f"expected 3 positive voxel counts (or one for a cube), "
                                             f"found {list(patch_size)}")
        axes = _spatial_axes(index.layout)
        for s in samples:
            if any(p > n for p, n in zip(patch_size, s.shape[axes])):
                raise DatasetError(index.file(s.image), f"patch_size {list(patch_size)} does not fit in sample "
                                                        f"{s.id!r} of spatial shape {list(s.shape[axes])}")
    with_label = [s.label is not None for s in samples]
    if any(with_label) and not all(with_label):
        bare = samples[with_label.index(False)]
        raise DatasetError(index.file(bare.image), f"sample {bare.id!r} has no label map while other samples of "
                                                   f"split {split!r} have one: batches need both or neither")
    image_shape, image_dtype = _common(index, samples, "shape", "dtype", patch_size, batch_size)
    label_shape = label_dtype = None
    if all(with_label):
        label_shape, label_dtype = _common(index, samples, "label_shape", "label_dtype", patch_size, batch_size)
    return _Plan(index=index, samples=samples, patch_size=patch_size, image_shape=image_shape,
                 image_dtype=image_dtype, label_shape=label_shape, label_dtype=label_dtype)


def _common(index: Index, samples, shape_key: str, dtype_key: str, patch_size, batch_size: int):
    """The shape (None where samples differ) and dtype every sample's ``shape_key`` / ``dtype_key`` share."""
    shapes = []
    for s in samples:
        shape = list(getattr(s, shape_key))
        if patch_size is not None:
            shape[_spatial_axes(index.layout)] = patch_size
        shapes.append(tuple(shape))
    dtypes = {getattr(s, dtype_key) for s in samples}
    if len(dtypes) > 1:
        raise DatasetError(index.path, f"the samples' {dtype_key} differ ({sorted(dtypes)}): a loader yields one dtype")
    if len({len(sh) for sh in shapes}) > 1 or (batch_size > 1 and len(set(shapes)) > 1):
        a, b = shapes[0], next(sh for sh in shapes if sh != shapes[0])
        raise DatasetError(index.path, f"samples of {shape_key} {list(a)} and {list(b)} cannot share a batch: "
                                       f"preprocess to one shape (crop_pad), set patch_size, or use batch_size=1")
    common = tuple(n if all(sh[i] == n for sh in shapes) else None for i, n in enumerate(shapes[0]))
    return common, dtypes.pop()


# ------------------------------------------------------------------------------ TensorFlow


def tf_dataset(index: Index | str | Path, split: str | None = "train", *, batch_size: int = 1,
               shuffle: bool = False, patch_size: Union[int, Sequence[int], None] = None, seed: int = 0,
               fold: int | None = None, drop_remainder: bool = False, num_parallel_calls: int | None = None,
               prefetch: bool = True):
    """A ``tf.data.Dataset`` of ``(image, label)`` batches of one split.

    Parameters
    ----------
    index : Index, str or path-like
        An index from :func:`read_index`, or the ``dataset.json`` (or its folder) to read.
    split : {"train", "val", "test"} or None
        Samples whose ``split`` is this (None: all); see :meth:`Index.select` for ``fold``.
    batch_size : int
        Samples per batch; the last batch may be smaller unless ``drop_remainder``.
    shuffle : bool
        Shuffle the samples, in another order each epoch (seeded by ``seed``).
    patch_size : int or sequence of 3 int, optional
        Read a random ``(X, Y, Z)`` patch of every sample (an int: a cube), inside the
        volume, at the same voxels in image and label; a new position each epoch
        (seeded by ``seed``). None: whole volumes.
    seed : int
        Seed of the shuffle and the patch positions: the same seed gives the same batches.
    fold : int, optional
        Cross-validation fold of an index split in folds (see :meth:`Index.select`).
    drop_remainder : bool
        Drop a last batch smaller than ``batch_size``.
    num_parallel_calls : int, optional
        Samples read at once; default ``tf.data.AUTOTUNE``.
    prefetch : bool
        Prepare the next batches while the model trains on one (``prefetch(AUTOTUNE)``).

    Returns
    -------
    tf.data.Dataset
        Of ``(image, label)``: image ``(B, C, X, Y, Z)`` (channels_first) or ``(B, X, Y, Z, C)``
        (channels_last) in the index's image dtype (float32 by default), label ``(B, 1, X, Y, Z)``
        or ``(B, X, Y, Z, 1)`` in its label dtype. Of images alone when the split has no label
        maps. ``X, Y, Z`` are the patch size with ``patch_size``. Batches keep sample order
        (shuffled or not), so a batch is ``samples[i:i + B]`` of the selection without shuffle.

    Raises
    ------
    DatasetError
        Raised here, before any read: see :func:`read_index`; an empty split; a sample in
        ``nifti`` format; samples that cannot share a batch (shapes differ and
        ``batch_size > 1``, dtypes differ, some without a label map); a patch larger than a
        sample. While iterating, a file changed since the index was written fails the read
        with the :class:`DatasetError`'s message inside a ``tf.errors.OpError``.
    ImportError
        If TensorFlow is not installed (``pip install niconv[tensorflow]``).
    """
    tf = _import("tensorflow", "tensorflow")
    plan = _plan(index, split, fold, patch_size, batch_size)
    with_label = plan.label_dtype is not None
    out_types = [tf.as_dtype(plan.image_dtype)] + ([tf.as_dtype(plan.label_dtype)] if with_label else [])

    def read(i, draw):  # runs in TensorFlow's reader threads, on numpy values
        sample = plan.samples[int(i)]
        corner = None
        if plan.patch_size is not None:
            corner = random_corner(sample.shape, plan.index.layout, plan.patch_size, np.random.default_rng(int(draw)))
        image, label = load_sample(plan.index, sample, corner, plan.patch_size)
        return (image, label) if with_label else (image,)

    def element(i, draw):
        arrays = tf.numpy_function(read, [i, draw], out_types, stateful=False)
        arrays[0].set_shape(plan.image_shape)
        if with_label:
            arrays[1].set_shape(plan.label_shape)
            return arrays[0], arrays[1]
        return arrays[0]

    ds = tf.data.Dataset.range(len(plan.samples))
    if shuffle:
        ds = ds.shuffle(len(plan.samples), seed=seed, reshuffle_each_iteration=True)
    # one random draw per sample read, another sequence each epoch: the patch positions
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, draws))
    ds = ds.map(element, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE) if prefetch else ds


# ------------------------------------------------------------------------------ PyTorch


def _import(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed: pip install 'niconv[{extra}]' ({exc})") from None


def _torch_dataset_class():
    torch = _import("torch", "torch")

    class TorchDataset(torch.utils.data.Dataset):
        """A ``torch.utils.data.Dataset`` over one split of a dataset index.

        Parameters
        ----------
        index : Index, str or path-like
            An index from :func:`read_index`, or the ``dataset.json`` (or its folder) to read.
        split : {"train", "val", "test"} or None
            Samples whose ``split`` is this (None: all).
        patch_size : int or sequence of 3 int, optional
            A random ``(X, Y, Z)`` patch of every sample (an int: a cube), inside the volume,
            the same voxels in image and label; drawn from torch's random state (seeded per
            worker by the ``DataLoader``, or by ``torch.manual_seed`` without workers).
        fold : int, optional
            Cross-validation fold (see :meth:`Index.select`).

        Items are ``(image, label)`` tensors: image ``(C, X, Y, Z)`` (channels_first) or
        ``(X, Y, Z, C)`` in the index's image dtype (float32 by default), label ``(1, X, Y, Z)``
        or ``(X, Y, Z, 1)`` in its label dtype (convert with ``label[:, 0].long()`` for
        ``CrossEntropyLoss``); the image alone when the split has no label maps. ``.npy``
        samples are read by memory map; ``DataLoader(num_workers=N)`` reads N at once.

        Raises
        ------
        DatasetError
            As :func:`tf_dataset`, when the dataset is made (a batch size of 1 is assumed
            here: :func:`torch_loader` checks that samples can share its batches).
        """

        def __init__(self, index, split: str | None = "train", *, patch_size=None, fold: int | None = None,
                     _batch_size: int = 1):
            self.plan = _plan(index, split, fold, patch_size, _batch_size)
            self.samples = self.plan.samples

        def __len__(self) -> int:
            return len(self.plan.samples)

        def __getitem__(self, i: int):
            plan = self.plan
            sample = plan.samples[i]
            corner = None
            if plan.patch_size is not None:
                seed = int(torch.randint(0, 2**62, ()).item())
                corner = random_corner(sample.shape, plan.index.layout, plan.patch_size, np.random.default_rng(seed))
            image, label = load_sample(plan.index, sample, corner, plan.patch_size)
            if label is None:
                return torch.from_numpy(image)
            return torch.from_numpy(image), torch.from_numpy(label)

    TorchDataset.__module__, TorchDataset.__qualname__ = __name__, "TorchDataset"  # pickled by name (spawn)
    return TorchDataset


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    # the torch class is made when first asked for, so importing this module never imports torch
    if name == "TorchDataset":
        if name not in _CLASSES:
            _CLASSES[name] = _torch_dataset_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_loader(index: Index | str | Path, split: str | None = "train", *, batch_size: int = 1,
                 shuffle: bool = False, patch_size: Union[int, Sequence[int], None] = None, seed: int = 0,
                 fold: int | None = None, num_workers: int = 2, **options):
    """A ``torch.utils.data.DataLoader`` of ``(image, label)`` batches of one split.

    Parameters
    ----------
    index, split, patch_size, fold
        As :class:`TorchDataset`.
    batch_size : int
        Samples per batch.
    shuffle : bool
        Another order each epoch.
    seed : int
        Seeds the loader's generator: the shuffle and, with workers, the patch positions
        (the same seed gives the same batches).
    num_workers : int
        Worker processes reading samples in parallel (0: read in the training process).
    **options
        Passed to ``DataLoader`` (``drop_last``, ``pin_memory``, ``prefetch_factor``...;
        ``persistent_workers`` is True by default when there are workers).

    Returns
    -------
    torch.utils.data.DataLoader
        Batches ``(B, C, X, Y, Z)`` and ``(B, 1, X, Y, Z)`` (channels_first) or
        ``(B, X, Y, Z, C)`` and ``(B, X, Y, Z, 1)``; dtypes as :class:`TorchDataset`.

    Raises
    ------
    DatasetError
        As :func:`tf_dataset`, when the loader is made. While iterating, a file changed since
        the index was written fails the read: a :class:`DatasetError` without workers, a
        ``RuntimeError`` carrying its message from a worker (PyTorch's way).
    ImportError
        If PyTorch is not installed (``pip install niconv[torch]``).
    """
    torch = _import("torch", "torch")
    dataset = __getattr__("TorchDataset")(index, split, patch_size=patch_size, fold=fold, _batch_size=batch_size)
    options = {"persistent_workers": num_workers > 0, **options}  # workers kept from one epoch to the next
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed), **options)
