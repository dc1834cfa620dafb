"""Training views: the uint8 training crop equals torchvision's seeded float transform once
normalised on the device; SILC's multi-crop views: counts and sizes from the config, drawn from
the sample's seed."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from megaclip.config import LocalGlobalConfig, load_config
from megaclip.data.decode import load_image, open_image
from megaclip.data.views import MultiCrop, TrainCrop, normalise, seeded, train_transform
from megaclip.engine.step import to_device
from megaclip.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(seed=0, side=120):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side + 20, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height,scale", [(140, 120, (0.08, 1.0)), (300, 40, (0.5, 1.0)),
                                                (20, 30, (0.9, 1.0))])
def test_train_crop_normalised_equals_the_float_transform(width, height, scale):
    """The loader's uint8 crop, normalised as to_device does, is exactly the old float view
    (the same box from the same seed, the same resize kernel, the same arithmetic)."""
    image = _image(side=height).resize((width, height))
    old = train_transform(32, scale, MEAN, STD)
    crop = TrainCrop(32, scale)
    for seed in range(20):
        view = crop(image, crop.box(width, height, seed), (width, height))
        assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)
        assert torch.equal(normalise(view, MEAN, STD), seeded(old, image, seed))
        batch = to_device({"images": view[None]}, torch.device("cpu"), torch.float32, MEAN, STD)
        assert torch.equal(batch["images"][0], seeded(old, image, seed))


def test_train_crop_depends_on_the_seed_alone():
    crop, image = TrainCrop(32, (0.08, 1.0)), _image()
    torch.manual_seed(1)
    a = crop.box(*image.size, seed=5)
    torch.manual_seed(2)
    assert crop.box(*image.size, seed=5) == a  # the global generator's state does not matter
    assert len({crop.box(*image.size, seed=s) for s in range(20)}) == 20
    before = torch.get_rng_state()
    crop.box(*image.size, seed=6)
    seeded(lambda img: torch.rand(3), image, 9)
    assert torch.equal(torch.get_rng_state(), before)  # neither leaves the global one changed


def test_to_device_needs_mean_and_std_for_uint8_and_keeps_float():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(to_device({"images": x}, torch.device("cpu"), torch.float32)["images"], x)
    with pytest.raises(ValueError, match="needs mean and std"):
        to_device({"images": x.to(torch.uint8)}, torch.device("cpu"), torch.float32)


def _jpeg_sample(side):
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buf, format="JPEG")
    return {"jpg": buf.getvalue()}


def test_jpeg_draft_decodes_small_and_keeps_the_crop():
    """A crop far larger than the model's size is decoded at a JPEG scale that keeps it above
    that size; the view is close to the one from the full decode."""
    crop = TrainCrop(64, (0.5, 1.0))
    sample = _jpeg_sample(1024)
    box = crop.box(1024, 1024, seed=0)
    size = crop.draft_size(1024, 1024, box)
    assert size is not None
    drafted = load_image(open_image(sample, ("jpg",), 10 ** 8), size)
    assert drafted.width < 1024 and min(box[2:]) * drafted.width / 1024 >= 64
    full = load_image(open_image(sample, ("jpg",), 10 ** 8))
    a = crop(drafted, box, (1024, 1024)).float()
    b = crop(full, box, (1024, 1024)).float()
    assert a.shape == b.shape == (3, 64, 64) and (a - b).abs().mean() < 3
    assert crop.draft_size(100, 100, crop.box(100, 100, seed=0)) is None  # too small to draft


@pytest.mark.parametrize("globals_,locals_", [(2, 8), (3, 0), (1, 4)])
def test_counts_and_sizes_follow_the_config(globals_, locals_):
    crops = MultiCrop(48, LocalGlobalConfig(global_crops=globals_, local_crops=locals_,
                                            local_size=24))
    g, loc = crops(_image())
    assert g.shape == (globals_, 3, 48, 48) and g.dtype == torch.uint8
    assert loc.shape == (locals_, 3, 24, 24) and loc.dtype == torch.uint8


def test_the_defaults_are_dinos_at_vit_b16():
    cfg = load_config(None, ["objective.preset=silc"])
    lg = cfg.objective.local_global
    assert (lg.global_crops, lg.local_crops, lg.local_size) == (2, 8, 96)
    assert lg.global_scale == (0.4, 1.0) and lg.local_scale == (0.05, 0.4)
    g, loc = MultiCrop(224, lg)(_image(side=256))
    assert g.shape == (2, 3, 224, 224) and loc.shape == (8, 3, 96, 96)


@pytest.mark.parametrize("photometric", ["dino", "colour_safe", "none"])
def test_same_sample_and_seed_give_the_same_crops(photometric):
    crops = MultiCrop(32, LocalGlobalConfig(local_size=16, photometric=photometric))
    image = _image()
    torch.manual_seed(123)
    a = seeded(crops, image, seed=7)
    torch.manual_seed(456)  # the global generator's state does not matter
    b = seeded(crops, image, seed=7)
    c = seeded(crops, image, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # Every view is a different crop.
    assert not torch.equal(a[0][0], a[0][1])
    assert len({tuple(v.flatten()[:20].tolist()) for v in a[1]}) == a[1].shape[0]


def test_colour_safe_keeps_the_hue_of_a_coloured_image():
    """The synthetic captions name colours: colour_safe views of a pure red image stay red."""
    red = Image.new("RGB", (64, 64), (200, 20, 20))
    for kind, grey_seen in (("colour_safe", False), ("dino", True)):
        crops = MultiCrop(32, LocalGlobalConfig(local_size=16, photometric=kind))
        greys = 0
        for seed in range(40):
            g, loc = seeded(crops, red, seed)
            views = torch.cat([g.flatten(2).float().mean(-1), loc.flatten(2).float().mean(-1)])
            views /= 255  # mean colours in [0, 1]
            greys += int(((views[:, 0] - views[:, 1]).abs() < 0.05).sum())
        assert (greys > 0) == grey_seen, (kind, greys)


def test_local_size_must_tile_into_patches():
    from megaclip.models.presets import check_multicrop, resolve_model_config
    cfg = load_config("clip_tiny_synthetic", ["objective.preset=silc",
                                              "objective.local_global.local_size=28"])
    with pytest.raises(UserError, match="local_size 28 is not a multiple of"):
        check_multicrop(resolve_model_config(cfg.model, 128), cfg.objective)


@pytest.mark.parametrize("override,needle", [
    ("objective.local_global.global_crops=0", "global_crops >= 1"),
    ("objective.local_global.local_scale=[0.5,0.2]", "local_scale"),
    ("objective.local_global.photometric=sepia", "photometric must be one of"),
    ("objective.contrastive_view=masked", "cannot be combined with objective.local_global"),
    ("objective.teacher.momentum=0.999", "set momentum_end with momentum"),
])
def test_bad_multicrop_settings_are_named(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, ["objective.preset=silc", override])


def test_pictures_show_uint8_and_normalised_views_alike():
    from megaclip.eval.pictures import denormalise
    view = TrainCrop(32, (0.5, 1.0))(_image(), (0, 0, 100, 100), (140, 120))[None]
    shown = denormalise(view, MEAN, STD)
    assert torch.allclose(shown, view.float() / 255)
    assert torch.allclose(denormalise(normalise(view, MEAN, STD), MEAN, STD), shown, atol=1e-6)


def test_train_crop_box_is_torchvisions_on_large_photos():
    """The box equals v2.RandomResizedCrop's after torch.manual_seed(seed), also where a float64
    aspect ratio would round a side the other way (about 1e-4 of draws on 1000-8000 px)."""
    rng, crop = random.Random(0), TrainCrop(224, (0.5, 1.0))
    reference = v2.RandomResizedCrop(224, scale=(0.5, 1.0))
    for _ in range(20000):
        width, height, seed = rng.randint(1000, 8000), rng.randint(1000, 8000), rng.getrandbits(62)
        torch.manual_seed(seed)
        p = reference.make_params([torch.empty(3, height, width)])
        assert crop.box(width, height, seed) == (p["top"], p["left"], p["height"], p["width"])
