"""Dataset loaders on small files written in each dataset's real format (idx gz, CIFAR pickles in a tar.gz, text)."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest
import torch
import torchvision
from fake_datasets import write_cifar10_archive, write_fashion_mnist

from triformer.data import cifar10, fashion_mnist, image_classification, shakespeare

pytestmark = pytest.mark.pipeline


def test_fashion_mnist_offline_files_load_with_torchvision(tmp_path):
    arrays = write_fashion_mnist(tmp_path / "debian")
    origin = fashion_mnist.prepare(
        tmp_path / "root", offline_dir=[tmp_path / "nothing", tmp_path / "debian"], download=False
    )
    assert origin == f"offline: {tmp_path / 'debian'}"
    assert sorted(p.name for p in fashion_mnist.raw_folder(tmp_path / "root").iterdir()) == sorted(fashion_mnist.FILES)
    for train, split in ((True, "train"), (False, "t10k")):
        dataset = torchvision.datasets.FashionMNIST(str(tmp_path / "root"), train=train)
        images, labels = arrays[split]
        assert np.array_equal(dataset.data.numpy(), images)
        assert np.array_equal(dataset.targets.numpy(), labels)
    x, y = image_classification("fashion_mnist", tmp_path / "root", train=True, subset=8).tensors
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (torch.from_numpy(arrays["train"][0][:8]).float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
    assert torch.allclose(x[:, 0], expected)


def test_fashion_mnist_without_files_or_download_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.prepare(tmp_path / "root", offline_dir=tmp_path / "nothing", download=False)


@pytest.fixture
def http_folder(tmp_path):
    """An HTTP server on localhost serving tmp_path/www (torchvision's download wants HTTP, not file://)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_cifar10_download_path_on_an_archive_in_cifar_format(tmp_path, monkeypatch, http_folder):
    folder, url = http_folder
    written = write_cifar10_archive(folder / "cifar-10-python.tar.gz")
    md5 = written["md5"]
    cls = torchvision.datasets.CIFAR10
    # torchvision's own download, md5 checks and extraction, pointed at an archive served from localhost
    monkeypatch.setattr(cls, "url", f"{url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cls, "tgz_md5", md5["archive"])
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})
    cifar10.prepare(tmp_path / "root", download=True)
    images, labels = cifar10.tensors(tmp_path / "root", train=False)
    data, expected_labels = written["batches"]["test_batch"]
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(data).view(6, 3, 32, 32))  # channel planes, row-major
    assert labels.tolist() == expected_labels
    assert len(cifar10.load(tmp_path / "root", train=True)) == 30
    x, _ = image_classification("cifar10", tmp_path / "root", train=True).tensors
    assert x.shape == (30, 3, 32, 32)


def test_unknown_image_dataset():
    with pytest.raises(ValueError, match="unknown image dataset"):
        image_classification("mnist", "data", train=True)


@pytest.fixture
def texts(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b_play_gut.txt").write_text("To be, or not to be:\r\nthat is the question.\n")
    (folder / "a_play_gut.txt").write_text("Now is the winter of our discontent.\n")
    (folder / "a_play_gut_f.txt").write_text("Now is the Winter of our Discontent\n")  # another edition
    (folder / "metadata.txt").write_text("not a play\n")
    return folder


def test_shakespeare_corpus_split_vocab_and_round_trip(tmp_path, texts):
    meta = shakespeare.prepare(tmp_path / "out", val_fraction=0.25, editions=["gut"], texts_dir=texts)
    text = "Now is the winter of our discontent.\n\n\nTo be, or not to be:\nthat is the question.\n"
    assert meta["sources"] == ["a_play_gut.txt", "b_play_gut.txt"]
    assert meta["vocab"] == "".join(sorted(set(text))) and meta["vocab_size"] == len(set(text))
    train, meta_loaded = shakespeare.load(tmp_path / "out", "train")
    val, _ = shakespeare.load(tmp_path / "out", "val")
    assert meta_loaded == meta and train.dtype == torch.int64
    assert len(val) == int(len(text) * 0.25) and len(train) + len(val) == len(text)
    assert shakespeare.decode(train, meta["vocab"]) + shakespeare.decode(val, meta["vocab"]) == text
    assert np.load(tmp_path / "out" / "train.npy").dtype == np.uint16
    # fixed: the same files give the same bytes
    shakespeare.prepare(tmp_path / "again", val_fraction=0.25, editions=["gut"], texts_dir=texts)
    for name in ("train.npy", "val.npy", "meta.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_shakespeare_editions_and_errors(texts, tmp_path):
    assert [p.name for p in shakespeare.source_files(["gut_f"], texts)] == ["a_play_gut_f.txt"]
    with pytest.raises(ValueError, match="unknown Shakespeare editions"):
        shakespeare.source_files(["quarto"], texts)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        shakespeare.encode("xyz", "xy")
    with pytest.raises(ValueError, match="val_fraction"):
        shakespeare.prepare(tmp_path, val_fraction=1.0, texts_dir=texts)


def test_shakespeare_package_texts_are_installed():
    names = [p.name for p in shakespeare.source_files()]
    assert "hamlet_gut.txt" in names and all(n.endswith("_gut.txt") for n in names)


def test_a_negative_subset_is_refused_not_all_but_the_last(tmp_path):
    write_fashion_mnist(tmp_path / "debian")
    fashion_mnist.prepare(tmp_path / "root", offline_dir=tmp_path / "debian", download=False)
    with pytest.raises(ValueError, match="subset must be an integer ≥ 0"):
        image_classification("fashion_mnist", tmp_path / "root", train=True, subset=-5)
