"""Loaders: batches of the right form, and the on-disk cache of deterministic transforms."""

import nibabel as nib
import numpy as np
import torch

from medfed.client.data.loader import make_loader, transform_cache_dir
from medfed.client.data.site import load_site
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_segmentation_batches(seg_sites):
    cfg = tiny_config()
    site = load_site(seg_sites / "site-0", cfg)
    batch = next(iter(make_loader(site, site.train, cfg, train=True, device=CPU)))
    assert batch["image"].shape == (8, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8, 1, 32, 32)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0


def test_persistent_cache_is_written_reused_and_invalidated(tmp_path, seg_sites):
    import shutil

    site_dir = tmp_path / "site"
    shutil.copytree(seg_sites / "site-1", site_dir)
    cfg, cache = tiny_config(), tmp_path / "cache"
    site = load_site(site_dir, cfg, cache_dir=cache)
    first = [
        b["image"]
        for b in make_loader(site, site.val, cfg, train=False, device=CPU, cache_dir=cache)
    ]
    files = sorted((transform_cache_dir(cache, cfg, site, False)).glob("*.pt"))
    assert len(files) == len(site.val)
    again = [
        b["image"]
        for b in make_loader(site, site.val, cfg, train=False, device=CPU, cache_dir=cache)
    ]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sorted(transform_cache_dir(cache, cfg, site, False).glob("*.pt")) == files

    edited = site_dir / site.val[0]["where"]
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), edited)
    site = load_site(site_dir, cfg, cache_dir=cache)
    changed = next(
        iter(make_loader(site, site.val, cfg, train=False, device=CPU, cache_dir=cache))
    )["image"]
    assert float(changed[0].abs().sum()) == 0.0, "an edited file is not served from the cache"
    bigger = tiny_config(image_size=64)
    assert transform_cache_dir(cache, bigger, site, False) != transform_cache_dir(
        cache, cfg, site, False
    )


def test_an_image_cached_for_training_is_evaluated_through_the_whole_pipeline(tmp_path, cls_sites):
    """Under another seed an image moves between splits; the cache of one pipeline
    (the stage before the first random transform) never stands for the other's output."""
    cfg, cache = tiny_config(task="classification"), tmp_path / "cache"
    site = load_site(cls_sites / "site-0", cfg, cache_dir=cache)
    items = site.train[:4]
    for _ in make_loader(site, items, cfg, train=True, device=CPU, cache_dir=cache):
        pass
    batch = next(iter(make_loader(site, items, cfg, train=False, device=CPU, cache_dir=cache)))
    assert set(batch) == {"image", "label"}
    assert transform_cache_dir(cache, cfg, site, True) != transform_cache_dir(
        cache, cfg, site, False
    )


def test_each_round_draws_new_batches_reproducibly(seg_sites):
    """Same round: same batches (reproducible); next round: a new order and new flips."""
    cfg = tiny_config()
    site = load_site(seg_sites / "site-0", cfg)

    def first_batch(server_round):
        loader = make_loader(
            site, site.train, cfg, train=True, device=CPU, server_round=server_round
        )
        return next(iter(loader))["image"]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))
