"""Records read on demand (``StreamedTable``): the same splits, sums, training and run as in memory, and no
step of a site's round ever reads more than one batch of records at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import consortium
from consortium.data import Splits, StreamedTable, Table, load_builtin, load_image_array, load_image_folder, split_table
from consortium.data import stream as stream_module
from consortium.data.images import synthetic_images, write_image_folder
from consortium.errors import DataError
from consortium.learning.specs import TrainSettings
from consortium.learning.training import TrainingData
from consortium.privacy.dpsgd import secure_generator, train_dp_sgd
from consortium.protocol.contributions import setup_sums, setup_vector
from consortium.protocol.site import Site


class Rows:
    """A map-style dataset over arrays that counts its reads (a stand-in for a folder of files)."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y, self.reads = X, y, 0

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.from_numpy(self.X[i]), int(self.y[i]) if self.y.dtype.kind == "i" else float(self.y[i])


def streamed(table: Table, batch_rows: int = 8) -> StreamedTable:
    return StreamedTable(Rows(table.X, table.y), feature_names=table.feature_names, classes=table.classes,
                         image_shape=table.image_shape, imputed=table.imputed, batch_rows=batch_rows)


@pytest.fixture(scope="module")
def cancer() -> Table:
    return load_builtin("breast-cancer").take(np.arange(150))


def test_a_streamed_table_reads_what_a_table_holds_a_batch_at_a_time(cancer):
    records = streamed(cancer)
    assert (records.n_rows, records.n_features, records.classes) == (cancer.n_rows, cancer.n_features, cancer.classes)
    batches = list(records.batches())
    assert [b.n_rows for b in batches] == [8] * 18 + [6]
    np.testing.assert_array_equal(np.concatenate([b.X for b in batches]), cancer.X)
    np.testing.assert_array_equal(records.labels, cancer.y)
    np.testing.assert_array_equal(records.take(np.array([3, 140])).X, cancer.X[[3, 140]])
    np.testing.assert_allclose(setup_sums(records), setup_vector(cancer.X), rtol=1e-12)  # the setup sums, batch by batch


def test_a_streamed_table_splits_as_a_table_does_reading_only_its_labels(cancer):
    records = streamed(cancer)
    _ = records.labels
    reads = records.dataset.reads
    parts = split_table(records, np.random.default_rng(5))
    assert records.dataset.reads == reads  # the splits are streamed too: nothing more was read
    assert isinstance(parts.train, StreamedTable)
    expected = split_table(cancer, np.random.default_rng(5))
    for got, want in zip((parts.train, parts.validation, parts.test), (expected.train, expected.validation, expected.test)):
        np.testing.assert_array_equal(got.to_table().X, want.X)
        np.testing.assert_array_equal(got.labels, want.y)


def test_what_cannot_be_streamed_is_refused_naming_the_fix(cancer):
    def records():
        yield cancer.X[0], 0

    with pytest.raises(DataError, match="map-style torch.utils.data.Dataset, since DP-SGD samples records by index"):
        StreamedTable(records(), feature_names=cancer.feature_names, classes=cancer.classes)

    class Stream(torch.utils.data.IterableDataset):  # has __getitem__ (Dataset's) and even a length
        def __iter__(self):
            return records()

        def __len__(self):
            return 1

    with pytest.raises(DataError, match="a Stream cannot be sampled at random"):
        StreamedTable(Stream(), feature_names=cancer.feature_names, classes=cancer.classes)
    with pytest.raises(DataError, match=r"record 0 of the dataset has 30 values and 3 feature names"):
        StreamedTable(Rows(cancer.X, cancer.y), feature_names=("a", "b", "c"), classes=cancer.classes)
    named = StreamedTable(Rows(cancer.X, cancer.y), classes=cancer.classes)  # names by default
    assert named.feature_names[:2] == ("x0", "x1") and named.n_features == 30
    with pytest.raises(DataError, match=r"record 0 of the dataset has 30 values and 27 feature names"):
        StreamedTable(Rows(cancer.X, cancer.y), classes=cancer.classes, image_shape=(3, 3, 3))
    with pytest.raises(DataError, match="holds no record"):
        StreamedTable(Rows(cancer.X[:0], cancer.y[:0]), feature_names=cancer.feature_names, classes=cancer.classes)
    bad = cancer.y.copy()
    bad[10] = 7  # a label outside the two classes, in the second batch
    records = StreamedTable(Rows(cancer.X, bad), feature_names=cancer.feature_names, classes=cancer.classes, batch_rows=8)
    with pytest.raises(DataError, match=r"^dataset rows 8\.\.15: Table.y holds values in \[0, 7\]"):
        list(records.batches())


def test_dp_sgd_on_streamed_rows_sums_the_same_clipped_gradients_a_chunk_at_a_time(cancer):
    def train(data):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        loss = train_dp_sgd(model, data, TrainSettings(lr=0.05, momentum=0.0), sampling_rate=0.3, noise_multiplier=1.0,
                            clip=1.0, steps=4, generator=secure_generator(3))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), loss

    X = torch.from_numpy(cancer.X / cancer.X.max(axis=0))
    scaled = Table(X.numpy(), cancer.y, cancer.feature_names, cancer.classes)
    data = TrainingData(streamed(scaled, batch_rows=7))
    assert data.streamed and data.chunk_rows == 7
    (memory, loss_memory), (chunked, loss_chunked) = train(TrainingData.of(X, torch.from_numpy(cancer.y))), train(data)
    torch.testing.assert_close(chunked, memory, rtol=1e-5, atol=1e-6)  # the same sample, noise and sums
    assert loss_chunked == pytest.approx(loss_memory, rel=1e-5)


def test_a_site_fingerprints_streamed_records_as_the_same_records_in_memory(cancer):
    memory = split_table(cancer, np.random.default_rng(0))
    streaming = Splits(*(streamed(t) for t in (memory.train, memory.validation, memory.test)))
    a, b = Site("s", memory, seed=0), Site("s", streaming, seed=0)
    b._fingerprint_salt = a._fingerprint_salt
    assert a.fingerprint() == b.fingerprint()


def test_image_readers_stream_the_same_images_they_read_at_once(tmp_path):
    table = synthetic_images(40, size=12, n_classes=3, seed=0)
    write_image_folder(table, tmp_path / "folder")
    whole = load_image_folder(tmp_path / "folder", size=12)
    lazy = load_image_folder(tmp_path / "folder", size=12, stream=True)
    assert isinstance(lazy, StreamedTable) and lazy.image_shape == whole.image_shape == (3, 12, 12)
    np.testing.assert_array_equal(lazy.to_table().X, whole.X)
    np.testing.assert_array_equal(lazy.labels, whole.y)
    images = (table.X.reshape(-1, 3, 12, 12) * 255).round().astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", table.y)
    lazy = load_image_array(tmp_path / "images.npy", tmp_path / "labels.npy", layout="NCHW", stream=True)
    assert isinstance(lazy.dataset.images, np.memmap)  # left in the file, read a batch at a time
    np.testing.assert_array_equal(
        lazy.to_table().X, load_image_array(tmp_path / "images.npy", tmp_path / "labels.npy", layout="NCHW").X
    )


# -- a whole run on streamed records --------------------------------------------------------------------


class ArrayStudy(consortium.ClassificationTask):
    """Each site's records from its own X.npy and y.npy, read on demand (``stream``) or at once."""

    stream = True

    def model(self, shape):
        return torch.nn.Sequential(shape.standardize(), torch.nn.Linear(shape.n_features, 2))

    def load(self, path: Path):
        X, y = np.load(path / "X.npy"), np.load(path / "y.npy")
        layout = {"feature_names": tuple(f"f{j}" for j in range(X.shape[1])), "classes": ("benign", "malignant")}
        if type(self).stream:
            return StreamedTable(Rows(X, y), batch_rows=16, **layout)
        return Table(X=X, y=y, **layout)


class ArrayStudyInMemory(ArrayStudy):
    stream = False


def test_a_run_on_streamed_records_trains_and_scores_as_in_memory_one_batch_at_a_time(tmp_path, monkeypatch):
    table = load_builtin("breast-cancer")
    sites = []
    for k, rows in enumerate(np.array_split(np.random.default_rng(0).permutation(table.n_rows)[:360], 3)):
        folder = tmp_path / f"site-{k + 1}"
        folder.mkdir()
        np.save(folder / "X.npy", table.X[np.sort(rows)])
        np.save(folder / "y.npy", table.y[np.sort(rows)])
        sites.append({"name": f"site-{k + 1}", "path": str(folder)})
    # The baselines' plain training reads mini-batches of batch_size: the same 16 as the table's batch.
    config = {"rounds": 2, "data": {"dataset": "task", "task_sites": sites}, "privacy": {"test_seed": 1},
              "training": {"batch_size": 16}}

    largest = []
    take = StreamedTable.take

    def counted(self, idx):
        largest.append(len(np.asarray(idx)))
        return take(self, idx)

    monkeypatch.setattr(StreamedTable, "take", counted)
    lazy = consortium.simulate(config, task=ArrayStudy(), out=tmp_path / "streamed")
    assert largest and max(largest) <= 16  # setup, DP-SGD, evaluation, baselines: never more than a batch
    assert lazy.summary["privacy"]["level"] == "record" and lazy.summary["secure_aggregation"]["enabled"]
    assert lazy.verify().status == "completed"
    whole = consortium.simulate(config, task=ArrayStudyInMemory(), out=tmp_path / "memory")
    for key in ("accuracy", "loss", "auc"):
        assert lazy.metrics[key] == pytest.approx(whole.metrics[key], abs=1e-3)
    assert lazy.summary["pooled"]["accuracy"] == pytest.approx(whole.summary["pooled"]["accuracy"], abs=1e-3)
    assert lazy.summary["local_only"]["accuracy_mean"] == pytest.approx(whole.summary["local_only"]["accuracy_mean"], abs=1e-3)
    assert stream_module.DEFAULT_BATCH_ROWS > 16  # the test's batch is its own, smaller than the default


def test_a_large_table_in_memory_is_read_in_bounded_views_too():
    rng = np.random.default_rng(0)
    table = Table(rng.standard_normal((10_000, 3)).astype(np.float32), rng.integers(0, 2, 10_000), ("a", "b", "c"), ("n", "y"))
    batches = list(table.batches())
    assert [b.n_rows for b in batches] == [4096, 4096, 1808] and table.batch_rows == 4096
    assert all(np.shares_memory(b.X, table.X) for b in batches)  # views: nothing copied
    np.testing.assert_allclose(setup_sums(table), setup_vector(table.X), rtol=1e-12)
    small = table.take(np.arange(10))
    assert list(small.batches()) == [small]


def test_a_bare_dataset_from_load_is_refused_naming_the_wrapper(tmp_path):
    class Bare(ArrayStudy):
        def load(self, path):
            return Rows(np.zeros((4, 2), dtype=np.float32), np.zeros(4, dtype=np.int64))

    with pytest.raises(DataError, match=r"load returned a Rows: .* wrap a dataset as StreamedTable\(dataset, classes="):
        Bare().records(tmp_path)
