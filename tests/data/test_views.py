"""SILC's multi-crop views: counts and sizes from the config, drawn from the sample's seed."""
import numpy as np
import pytest
import torch
from PIL import Image

from megaclip.config import LocalGlobalConfig, load_config
from megaclip.data.views import MultiCrop, seeded
from megaclip.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(seed=0, side=120):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side + 20, 3), dtype=np.uint8))


@pytest.mark.parametrize("globals_,locals_", [(2, 8), (3, 0), (1, 4)])
def test_counts_and_sizes_follow_the_config(globals_, locals_):
    crops = MultiCrop(48, LocalGlobalConfig(global_crops=globals_, local_crops=locals_,
                                            local_size=24), MEAN, STD)
    g, loc = crops(_image())
    assert g.shape == (globals_, 3, 48, 48) and g.dtype == torch.float32
    assert loc.shape == (locals_, 3, 24, 24)


def test_the_defaults_are_dinos_at_vit_b16():
    cfg = load_config(None, ["objective.preset=silc"])
    lg = cfg.objective.local_global
    assert (lg.global_crops, lg.local_crops, lg.local_size) == (2, 8, 96)
    assert lg.global_scale == (0.4, 1.0) and lg.local_scale == (0.05, 0.4)
    g, loc = MultiCrop(224, lg, MEAN, STD)(_image(side=256))
    assert g.shape == (2, 3, 224, 224) and loc.shape == (8, 3, 96, 96)


@pytest.mark.parametrize("photometric", ["dino", "colour_safe", "none"])
def test_same_sample_and_seed_give_the_same_crops(photometric):
    crops = MultiCrop(32, LocalGlobalConfig(local_size=16, photometric=photometric), MEAN, STD)
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
        crops = MultiCrop(32, LocalGlobalConfig(local_size=16, photometric=kind), (0, 0, 0),
                          (1, 1, 1))
        greys = 0
        for seed in range(40):
            g, loc = seeded(crops, red, seed)
            views = torch.cat([g.flatten(2).mean(-1), loc.flatten(2).mean(-1)])  # mean colours
            greys += int(((views[:, 0] - views[:, 1]).abs() < 0.05).sum())
        assert (greys > 0) == grey_seen, (kind, greys)


def test_local_size_must_tile_into_patches():
    from megaclip.models.registry import check_multicrop, resolve_model_config
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
