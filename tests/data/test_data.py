import dataclasses
import http.server
import multiprocessing
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, make_imagefolder, mixed_size_folder, write_config, write_image

from finetune.config.schema import DataConfig
from finetune.data.batching import BatchTransform, epoch_plan
from finetune.data.imageset import worker_count
from finetune.data.sources import choose_subset, load_data
from finetune.errors import FinetuneError


def test_stratified_subset_keeps_proportions_and_is_seeded():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    a = choose_subset(labels, 100, "stratified", seed=1)
    assert np.bincount(labels[a]).tolist() == [40, 30, 20, 10]
    assert np.array_equal(a, choose_subset(labels, 100, "stratified", seed=1))
    assert not np.array_equal(a, choose_subset(labels, 100, "stratified", seed=2))


def test_first_and_random_subsets():
    labels = np.arange(50) % 5
    assert choose_subset(labels, 7, "first", seed=0).tolist() == list(range(7))
    r = choose_subset(labels, 7, "random", seed=0)
    assert len(set(r.tolist())) == 7
    assert choose_subset(labels, None, "random", seed=0).tolist() == list(range(50))


def test_imagefolder_reads_classes_sorted_and_every_image_mode(tmp_path):
    root = make_imagefolder(tmp_path, classes=("b", "a"), train_per_class=2, val_per_class=1)
    rng = np.random.default_rng(0)
    write_image(root / "train" / "a" / "gray.png", 0, rng, mode="L")
    write_image(root / "train" / "a" / "rgba.png", 0, rng, mode="RGBA")
    write_image(root / "train" / "b" / "big.jpg", 1, rng, size=50)
    data = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=40))
    assert data.class_names == ["a", "b"]
    assert len(data.train) == 7 and len(data.val) == 2
    # mixed sizes are resized to image_size so they stack; all are 3-channel uint8
    assert data.train.images.shape == (7, 3, 40, 40) and data.train.images.dtype == torch.uint8
    assert data.train.labels.tolist().count(0) == 4


def test_uniform_images_stay_at_their_own_size(imagefolder):
    data = load_data(DataConfig(dataset="imagefolder", root=str(imagefolder), image_size=224))
    assert data.train.images.shape[-2:] == (24, 24)


def test_train_classes_restrict_training_only(imagefolder):
    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder), train_classes=["cat", 2])
    data = load_data(cfg)
    assert set(data.train.labels.tolist()) == {0, 2}
    assert set(data.val.labels.tolist()) == {0, 1, 2}


def test_train_classes_naming_a_missing_class(imagefolder):
    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder), train_classes=["cow"])
    with pytest.raises(FinetuneError, match=r"data\.train_classes: 'cow' is not a class .*cat, dog, frog"):
        load_data(cfg)


def test_corrupt_and_empty_files_are_skipped_with_one_warning(imagefolder):
    (imagefolder / "train" / "cat" / "zero.png").write_bytes(b"")
    (imagefolder / "train" / "dog" / "junk.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\): .*zero.png.*junk.jpg"):
        data = load_data(DataConfig(dataset="imagefolder", root=str(imagefolder)))
    assert len(data.train) == 8 * len(CLASSES)


def test_digits_needs_no_network_and_splits_by_split_seed():
    cfg = DataConfig(dataset="digits", train_size=None, val_size=None)
    a, b = load_data(cfg), load_data(cfg)
    assert len(a.train) + len(a.val) == 1797
    assert torch.equal(a.val.labels, b.val.labels)
    assert a.train.images.shape[1:] == (3, 8, 8)


def test_cifar10_offline_says_how_to_use_a_local_copy(tmp_path):
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(FinetuneError, match=r"CIFAR-10 is not in data.root=.* data\.dataset: imagefolder"):
        load_data(cfg)


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    o1, f1 = epoch_plan(100, seed=1, epoch=2, hflip=True)
    o2, f2 = epoch_plan(100, seed=1, epoch=2, hflip=True)
    o3, _ = epoch_plan(100, seed=1, epoch=3, hflip=True)
    assert torch.equal(o1, o2) and torch.equal(f1, f2) and not torch.equal(o1, o3)
    assert 30 < int(f1.sum()) < 70
    assert not epoch_plan(100, seed=1, epoch=2, hflip=False)[1].any()


def test_batch_transform_resizes_flips_and_normalizes():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[:, :, :, 0] = 255  # left column white
    t = BatchTransform(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), device=torch.device("cpu"))
    out = t(images, torch.tensor([False, True]))
    assert out.shape == (2, 3, 8, 8)
    assert out[0, 0, 0, 0] > 0.9 and out[0, 0, 0, -1] < -0.9
    assert out[1, 0, 0, -1] > 0.9 and out[1, 0, 0, 0] < -0.9


def test_batch_transform_antialiases_a_downscale_and_upscales_as_antialiasing_would():
    """Only a downscale needs antialiasing; the faster plain kernel must upscale to the same pixels."""
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    for size in (40, 6):
        t = BatchTransform(size, mean=(0.0,) * 3, std=(1.0,) * 3, device=torch.device("cpu"))
        expected = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", antialias=True)
        torch.testing.assert_close(t(images), expected, atol=1e-6, rtol=0)


def test_over_budget_images_stream_from_files_decoded_like_in_memory(tmp_path):
    root = mixed_size_folder(tmp_path)
    (root / "train" / "cat" / "zero.png").write_bytes(b"")
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=32, num_workers=2)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        memory = load_data(cfg)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        streamed = load_data(DataConfig(**{**vars(cfg), "memory_budget_mb": 0}))
    assert streamed.train.images is None and len(streamed.train.files) == len(memory.train) == 27
    assert torch.equal(streamed.train.labels, memory.train.labels)
    index = [torch.tensor([5, 0, 26]), torch.tensor([3])]
    for a, b in zip(streamed.train.batches(index), memory.train.batches(index), strict=True):
        assert torch.equal(a, b)
    assert streamed.train.fingerprint() != memory.train.fingerprint()


class CutShort(http.server.BaseHTTPRequestHandler):
    """Promises 100 kB and closes the connection after 1 kB, as a dropped download does."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()
        self.wfile.write(b"x" * 1000)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def cut_short_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz"
    server.shutdown()
    server.server_close()


def tree(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("failure", ["refused", "cut short"])
def test_a_failed_cifar10_download_says_so_in_one_line_and_leaves_no_litter(
    failure, tmp_path, monkeypatch, capsys, request
):
    """torchvision's own download, pointed at this machine so that no test reaches the network:
    a refused connection into a data.root that does not exist yet, and a download dropped
    half-way into a folder that holds the user's files. Either leaves the disk as it was."""
    from torchvision.datasets import CIFAR10

    from finetune.cli import main

    if failure == "refused":  # port 9 (discard) is closed: the connection is refused at once
        url, root = "http://127.0.0.1:9/cifar-10-python.tar.gz", tmp_path / "area" / "new" / "data"
    else:
        url, root = request.getfixturevalue("cut_short_url"), tmp_path / "area" / "data"
        write_image(root / "mine" / "keep.png", 0, np.random.default_rng(0))
    (tmp_path / "area").mkdir(exist_ok=True)
    monkeypatch.setattr(CIFAR10, "url", url)
    before = tree(tmp_path / "area")
    config = write_config(tmp_path / "c.yaml", root, tmp_path / "runs", data={"dataset": "cifar10"})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # torchvision draws a progress bar
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: CIFAR-10 download from {url} failed ("), errors[0]
    assert "data.dataset: imagefolder" in errors[0]
    assert tree(tmp_path / "area") == before


def test_num_workers_auto_is_one_per_core_and_0_loads_in_the_main_process(tmp_path):
    """As PyTorch's DataLoader: 0 starts no worker process; `auto` (the default) one per core."""
    import os

    root = make_imagefolder(tmp_path / "data")
    streamed = DataConfig(dataset="imagefolder", root=str(root), image_size=32, memory_budget_mb=0)
    assert load_data(streamed).train.workers == worker_count("auto") == os.cpu_count()
    assert worker_count(3) == 3
    main_process = load_data(dataclasses.replace(streamed, num_workers=0)).train
    batches, pids = streamed_pass(main_process, [torch.tensor([0, 5]), torch.tensor([3])])
    assert pids == set() and [len(b) for b in batches] == [2, 1]
    in_memory = load_data(dataclasses.replace(streamed, num_workers=0, memory_budget_mb=4096)).train
    assert in_memory.images is not None and len(in_memory) == len(main_process) == 24


def test_batch_transform_stays_float32_for_numpy_statistics():
    """A mean and std given as numpy float64 (as a library preset may be) must not make
    batches float64: MPS has no float64."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    t = BatchTransform(8, tuple(mean), tuple(std), device=torch.device("cpu"))
    out = t(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([False, True]))
    assert t.mean.dtype == t.std.dtype == out.dtype == torch.float32


def streamed_pass(images, index):
    """The batches of one pass over a streamed set and the worker processes alive during it."""
    batches, pids = [], set()
    for batch in images.batches(index):
        batches.append(batch)
        pids |= {child.pid for child in multiprocessing.active_children()}
    return batches, pids


def test_streamed_batches_keep_their_worker_processes_across_epochs(tmp_path):
    root = mixed_size_folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=32, num_workers=2, memory_budget_mb=0)
    train = load_data(cfg).train
    index = [torch.tensor([5, 0, 26]), torch.tensor([3, 4])]
    first, first_pids = streamed_pass(train, index)
    second, second_pids = streamed_pass(train, index)
    assert len(first_pids) == 2 and second_pids == first_pids
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    reordered, _ = streamed_pass(train, [torch.tensor([26, 0, 5])])
    assert torch.equal(reordered[0], first[0][[2, 1, 0]]), "a new pass serves its own index batches"


def test_a_second_pass_over_streamed_files_takes_the_workers_from_an_unfinished_one(tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=str(make_imagefolder(tmp_path)), num_workers=1, memory_budget_mb=0)
    val = load_data(cfg).val
    older = val.in_order(2)
    next(older)
    assert len(list(val.in_order(5))) == 3
    with pytest.raises(RuntimeError, match="another pass over these image files started"):
        next(older)
