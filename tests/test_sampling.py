"""Every subset of the calibration sample sees every class (issue 27, finding 1).

Image folders are sorted by class. Before this, the sample kept the folder's order, so the 64
images that reset each tuning candidate's BatchNorm, the refit's images and a process's shard
were the first one or two classes. Each test here failed then.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from zipcli import MergeOptions
from zipcli.calibration import list_images, sample_images
from zipcli.distributed import Ranks
from zipcli.evaluate import labelled_images
from zipcli.measured import Calibration
from zipcli.tuning import BN_IMAGES

from conftest import make_images, random_model, save_checkpoint, small_spec

CLASSES = [f"c{i}" for i in range(10)]


def share(files: list[Path]) -> Counter:
    counts = Counter(f.parent.name for f in files)
    return Counter({c: counts[c] / len(files) for c in CLASSES})


def distance(a: list[Path], b: list[Path]) -> float:
    """Total variation distance between the class histograms of two lists of files."""
    pa, pb = share(a), share(b)
    return sum(abs(pa[c] - pb[c]) for c in CLASSES) / 2


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory) -> Path:
    """A folder of ten class sub-folders, 40 images each (sorted by class, like CIFAR's)."""
    root = tmp_path_factory.mktemp("sorted")
    for c in CLASSES:                       # one class after another, so names sort by class
        make_images(root / "calib", 40, 32, seed=len(c), classes=[c])
    return root / "calib"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [200, 400, 10_000])
def test_every_prefix_of_the_sample_has_the_samples_classes(sorted_folder, seed, n):
    files = list_images(sorted_folder)
    sample = sample_images(files, n, seed)
    assert sorted(sample) == sorted(set(sample)) and len(sample) == min(n, len(files))
    for k in (BN_IMAGES, 100):
        assert set(share(sample[:k])) == set(CLASSES)
        assert distance(sample[:k], sample) < 0.2, (k, share(sample[:k]))


def test_the_sample_is_the_same_for_the_same_seed_and_differs_for_another(sorted_folder):
    files = list_images(sorted_folder)
    assert sample_images(files, 100, 3) == sample_images(files, 100, 3)
    assert sample_images(files, 100, 3) != sample_images(files, 100, 4)


def test_shards_of_two_processes_each_see_every_class(sorted_folder):
    sample = sample_images(list_images(sorted_folder), 400, 0)
    for rank in (0, 1):
        shard = Ranks(rank=rank, world=2).shard(sample, 64)
        assert distance(shard, sample) < 0.15


def test_the_merges_subsets_see_every_class(sorted_folder, tmp_path):
    """The images behind tuning's BatchNorm reset and the refit's images, in a real merge job."""
    spec = small_spec("resnet20")
    paths = [save_checkpoint(tmp_path / f"{n}.pt", random_model(spec, k, seed, sorted_folder).state_dict(),
                             [f"{n}{i}" for i in range(k)]) for n, seed, k in (("a", 1, 2), ("b", 2, 3))]
    cal = Calibration(paths, spec, sorted_folder, MergeOptions(num_calib=300, refit="lsq"))
    sample = cal.stream.files
    assert distance(sample, list_images(sorted_folder)) < 0.1
    assert distance(sample[:BN_IMAGES], sample) < 0.2         # what bn_subset() reads
    assert distance(cal.shard.files[:100], sample) < 0.2      # the prefix the refit reads


def test_eval_limit_draws_from_each_class_rather_than_taking_the_first_names(sorted_folder):
    root = sorted_folder.parent / "labelled"
    make_images(root, 40, 32, seed=9, classes=["x", "y"])
    items = labelled_images(root, limit=5)
    names = sorted(p.name for p, c in items if c == "x")
    first = sorted(p.name for p in sorted((root / "x").iterdir()))[:5]
    assert len(names) == 5 and names != first
    assert labelled_images(root, limit=5) == items


def test_the_listing_is_the_sorted_recursive_glob_it_replaced(tmp_path):
    """The sample is drawn from the listing's order, so the faster listing (directory entries, no
    stat per file) must give exactly what ``sorted(root.rglob("*"))`` gave, in the same order:
    Paths sort by parts ("a/b" before "a-b", unlike their strings), links to folders are not
    entered, links to files are kept, a folder named like an image is not a file."""
    from zipcli.calibration import IMAGE_SUFFIXES

    root = tmp_path / "imgs"
    for rel in ["a/b/x.jpg", "a-b/y.JPG", "A/z.png", ".hidden/h.jpg", "a/.q.jpg", "a/..jpg", "a/k.",
                "a/t.txt", "real/sub/r.jpg", "a/b/c/d/deep.webp"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "folder.jpg").mkdir()
    (root / "linked").symlink_to(root / "real")
    (root / "a" / "link.png").symlink_to(root / "A" / "z.png")
    (root / "a" / "broken.jpg").symlink_to(tmp_path / "nowhere")
    glob = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    listed = list_images(root)
    assert listed == glob and len(listed) == 9
    assert [str(p) for p in listed] != sorted(str(p) for p in listed)       # parts order, not string order
