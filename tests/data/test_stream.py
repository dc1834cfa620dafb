"""The training stream: bad samples skipped and counted, clear shard errors, exact resume."""
import io

import pytest
import torch
from PIL import Image

from megaclip.config import DataConfig, LocalGlobalConfig, MaskConfig, TextMlmConfig
from megaclip.data.masks import Masking
from megaclip.data.shards import ShardError, expand_shards
from megaclip.data.tokenizer import Tokenizer
from megaclip.data.views import MultiCrop
from megaclip.data.stream import TrainStream, build_train_loader
from megaclip.make.writer import write_shards
from megaclip.errors import UserError


def _jpeg(color, side=24):
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="JPEG")
    return buf.getvalue()


def _good(i):
    return {"__key__": f"good{i:04d}", "jpg": _jpeg((10 * i % 255, 80, 120)), "txt": f"sample {i}"}


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return Tokenizer(str(synthetic / "spm.model"), 16)


def _cfg(pattern, **kw):
    base = dict(train_shards=pattern, resampled=False, shuffle_buffer=0, workers=0,
                crop_scale=(0.8, 1.0), max_image_pixels=30 * 30, log_bad_samples=0)
    base.update(kw)
    return DataConfig(**base)


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, tokenizer):
    bad = [
        {"__key__": "undecodable", "jpg": b"this is not a jpeg", "txt": "x"},
        {"__key__": "nocaption", "jpg": _jpeg((1, 2, 3))},
        {"__key__": "notutf8", "jpg": _jpeg((1, 2, 3)), "txt": b"\xff\xfe\xfa caption"},
        {"__key__": "toolarge", "jpg": _jpeg((1, 2, 3), side=40), "txt": "big"},
        {"__key__": "noimage", "txt": "caption without image"},
        {"__key__": "emptycaption", "jpg": _jpeg((1, 2, 3)), "txt": "   "},
    ]
    samples = [_good(0), _good(1)] + bad + [_good(2), _good(3)]
    paths = write_shards(samples, str(tmp_path), maxcount=100)
    stream = TrainStream(_cfg(paths[0]), 16, tokenizer, batch_size=2, rank=0, world_size=1)
    it = iter(stream)
    first, second = next(it), next(it)
    assert first["images"].shape == (2, 3, 16, 16) and first["tokens"].shape == (2, 16)
    assert first["images"].dtype == torch.uint8  # normalised on the device (to_device)
    assert second["position"][1]["cursor"] == len(samples)  # 10 raw samples for 4 good ones
    assert second["skipped"] == {"undecodable_image": 1, "missing_caption": 2,
                                 "caption_not_utf8": 1, "image_too_large": 1, "missing_image": 1,
                                 "shards": 0}


def test_pattern_matching_nothing_names_it(tmp_path):
    with pytest.raises(UserError, match=r"nothing-\{0\.\.3\}\.tar.*matches no file"):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))


def test_partly_missing_shards_are_named_and_kept(tmp_path):
    """Kept: the shard sequences (and a resume) stay the same; reading them counts as bad."""
    paths = write_shards([_good(0)], str(tmp_path))
    pattern = paths[0].replace("000000", "{000000..000002}")
    with pytest.warns(UserWarning, match="2 of 3 shards.*shard-000001.tar"):
        assert expand_shards(pattern) == [paths[0].replace("000000", f"00000{i}")
                                          for i in range(3)]


@pytest.mark.parametrize("kind", ["garbage", "pipe"])
def test_a_stream_of_unreadable_shards_is_a_clear_error(tmp_path, tokenizer, kind):
    if kind == "garbage":
        url = str(tmp_path / "broken.tar")
        with open(url, "wb") as f:
            f.write(b"\x00garbage" * 100)
    else:
        url = f"pipe:cat {tmp_path}/does-not-exist.tar"
    stream = TrainStream(_cfg(url), 16, tokenizer, batch_size=2, rank=0, world_size=1)
    batch = next(iter(stream))
    assert batch["error"].startswith("20 shards in a row failed for rank 0 worker 0: " + url)


def test_too_few_shards_for_split_is_an_error(tmp_path, tokenizer):
    paths = write_shards([_good(0)], str(tmp_path))
    with pytest.raises(UserError, match="cannot be split over 2 ranks"):
        TrainStream(_cfg(paths[0]), 16, tokenizer, 2, rank=0, world_size=2)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


_TENSORS = ("images", "tokens", "image_mask", "mlm_tokens", "mlm_target", "mlm_embed", "views",
            "local_views")


def _same(a, b):
    return all(all(torch.equal(x[k], y[k]) for k in _TENSORS if k in x)
               for x, y in zip(a, b))


MASKING = Masking(grid=4, image=MaskConfig(ratio=0.75), text=TextMlmConfig(weight=0.05))


def test_resume_continues_exactly_with_workers(synthetic, tokenizer):
    """Views, image masks and caption masks of a resumed stream equal the uninterrupted ones."""
    cfg = _cfg(str(synthetic / "train" / "shard-{000000..000003}.tar"), resampled=True,
               shuffle_buffer=50, workers=2, crop_scale=(0.3, 1.0), max_image_pixels=10 ** 8)
    loader = build_train_loader(cfg, 32, tokenizer, 8, rank=1, world_size=2, masking=MASKING)
    it = iter(loader)
    batches = [next(it) for _ in range(5)]
    saved = loader.state.state_dict()
    batches += [next(it) for _ in range(3)]
    assert sorted(saved["positions"]) == [0, 1]  # both workers contributed
    assert batches[0]["image_mask"].shape == (8, 16) and batches[0]["mlm_target"].any()

    resumed = build_train_loader(cfg, 32, tokenizer, 8, rank=1, world_size=2, state=saved,
                                 masking=MASKING)
    again = _take(resumed, 3)
    assert _same(again, batches[5:8])
    assert all(torch.equal(a["image_mask"], b["image_mask"]) for a, b in zip(again, batches[5:]))


def test_resume_draws_the_same_multicrop_views(synthetic, tokenizer):
    """SILC's global and local crops of a resumed stream equal the uninterrupted ones."""
    cfg = _cfg(str(synthetic / "train" / "shard-{000000..000003}.tar"), resampled=True,
               shuffle_buffer=30, workers=2, max_image_pixels=10 ** 8)
    crops = MultiCrop(32, LocalGlobalConfig(local_crops=3, local_size=16))
    loader = build_train_loader(cfg, 32, tokenizer, 4, rank=0, world_size=1, masking=MASKING,
                                multicrop=crops)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    saved = loader.state.state_dict()
    batches += [next(it) for _ in range(3)]
    first = batches[0]
    assert first["images"].shape == (4, 3, 32, 32) and first["views"].shape == (4, 1, 3, 32, 32)
    assert first["local_views"].shape == (4, 3, 3, 16, 16) and first["image_mask"].shape == (4, 16)
    resumed = build_train_loader(cfg, 32, tokenizer, 4, rank=0, world_size=1, state=saved,
                                 masking=MASKING, multicrop=crops)
    assert _same(_take(resumed, 3), batches[3:])


def test_views_depend_on_seed_and_rank(synthetic, tokenizer):
    cfg = _cfg(str(synthetic / "train" / "shard-{000000..000003}.tar"), resampled=True,
               shuffle_buffer=20, max_image_pixels=10 ** 8)
    a = _take(TrainStream(cfg, 32, tokenizer, 4, 0, 2), 2)
    b = _take(TrainStream(cfg, 32, tokenizer, 4, 0, 2), 2)
    c = _take(TrainStream(cfg, 32, tokenizer, 4, 1, 2), 2)
    assert _same(a, b) and not _same(a, c)


def test_topology_change_restarts_the_stream_instead_of_replaying(synthetic, tokenizer):
    cfg = _cfg(str(synthetic / "train" / "shard-{000000..000003}.tar"), resampled=True,
               shuffle_buffer=20, max_image_pixels=10 ** 8)
    loader = build_train_loader(cfg, 32, tokenizer, 4, 0, 2)
    first = _take(loader, 2)
    other = build_train_loader(cfg, 32, tokenizer, 4, 0, 1, state=loader.state.state_dict(),
                               restart_seed=7)
    assert other.state.positions == {} and not _same(_take(other, 2), first)


def test_a_staged_plan_draws_extras_from_their_start_and_resumes_across_it(synthetic, tokenizer):
    """Terms that start late (start_at): micro-batches of the steps before the start have one
    crop and no masks, as a plain CLIP stream's; from the start on, the masks and multi-crop
    views of a stream that always draws them (2 workers, 2 micro-batches per step, start at
    step 3). A stream resumed before the start goes on with the same batches."""
    from megaclip.data.plan import DataPlan, DataStage
    cfg = _cfg(str(synthetic / "train" / "shard-{000000..000003}.tar"), resampled=True,
               shuffle_buffer=30, workers=2, max_image_pixels=10 ** 8)
    crops = MultiCrop(32, LocalGlobalConfig(local_crops=2, local_size=16))
    stages = (DataStage(0, None, False), DataStage(3, MASKING, True))

    def loader(first_step=0, state=None, **kw):
        plan = DataPlan(stages, first_step, accum=2) if not kw else None
        return build_train_loader(cfg, 32, tokenizer, 4, rank=0, world_size=1, state=state,
                                  plan=plan, **({"masking": MASKING, "multicrop": crops}
                                                if plan else kw))

    staged = loader()
    it = iter(staged)
    batches = [next(it) for _ in range(4)]
    saved = staged.state.state_dict()  # after step 1
    batches += [next(it) for _ in range(6)]
    plain = _take(loader(masking=None), 6)
    full = _take(loader(masking=MASKING, multicrop=crops), 10)
    assert all("image_mask" not in b and "views" not in b for b in batches[:6])
    assert _same(batches[:6], plain)
    assert all(b["views"].shape == (4, 1, 3, 32, 32) and "mlm_target" in b for b in batches[6:])
    assert _same(batches[6:], full[6:])
    assert _same(_take(loader(first_step=2, state=saved), 6), batches[4:])
