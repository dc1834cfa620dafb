"""The frozen-feature evaluations: linear probe, mIoU, dense probe, zero-shot segmentation."""
import torch

from megaclip.eval import probes


def test_split_by_class_keeps_every_class_in_every_part():
    labels = torch.arange(50) % 5
    train, val, test = probes.split_by_class(labels, (0.5, 0.2, 0.3))
    assert len(train) + len(val) + len(test) == 50
    assert set(torch.cat([train, val, test]).tolist()) == set(range(50))
    for part in (train, val, test):
        assert set(labels[part].tolist()) == set(range(5))


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    x = centres[labels] + torch.randn(400, 16, generator=g)
    train, val, test = probes.split_by_class(labels, (0.5, 0.2, 0.3))
    out = probes.linear_probe((x[train], labels[train]), (x[val], labels[val]),
                              (x[test], labels[test]), 4)
    assert out["linear_probe_top1"] > 0.95 and out["linear_probe_l2"] in probes.REGULARISATION
    noise = probes.linear_probe((x[train], labels[train].roll(1)), (x[val], labels[val]),
                                (x[test], labels[test]), 4)
    assert noise["linear_probe_top1"] < 0.5  # wrong labels: no better than chance-ish


def test_mean_iou_of_a_known_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 2, union 3
    assert abs(probes.mean_iou(pred, target, 3) - (1 / 3 + 2 / 3 + 2 / 3) / 3) < 1e-6
    assert probes.mean_iou(target.clamp_min(0), target, 3) == 1.0


def test_patch_labels_take_each_patchs_majority():
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 3  # the top-left patch of a 2x2 grid is all 3
    masks[0, 2:, 2:] = torch.tensor([[1, 1], [1, 2]])  # bottom-right mostly 1
    masks[0, :2, 2:] = -1  # top-right ignored
    assert probes.patch_labels(masks, 2, 4).tolist() == [[3, probes.IGNORE, 0, 1]]


def test_dense_probe_and_zeroshot_segmentation_on_perfect_features():
    """Patch tokens that are one-hot of their class: both reach an mIoU of 1."""
    grid, classes = 4, 3
    g = torch.Generator().manual_seed(1)
    patch_cls = torch.randint(0, classes, (30, grid, grid), generator=g)
    masks = patch_cls.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 16x16 pixels
    tokens = torch.nn.functional.one_hot(patch_cls.flatten(1), classes).float() * 5
    out = probes.dense_probe((tokens[:20], masks[:20]), (tokens[20:], masks[20:]), classes)
    assert out["dense_probe_miou"] > 0.7  # bilinear upsampling blurs the patch borders a bit
    text = torch.eye(classes)  # class c's text embedding is the c-th axis
    seg = probes.zeroshot_segmentation(tokens, text, masks, background=True)
    assert seg["zeroshot_seg_miou"] > 0.7
    shuffled = probes.zeroshot_segmentation(tokens, text.roll(1, 0), masks, background=True)
    assert shuffled["zeroshot_seg_miou"] < 0.1


def test_run_probes_on_a_model_with_separate_splits(synthetic):
    """Every evaluation runs end to end on a (random) tiny model: the synthetic eval split has
    masks; given (train, val) parts the probes fit there and score on the test set."""
    from megaclip.config import load_config
    from megaclip.data.eval_set import EvalSet
    from megaclip.data.tokenizer import Tokenizer
    from megaclip.models import build_model, resolve_model_config
    cfg = load_config("clip_tiny_synthetic", [])
    model_cfg = resolve_model_config(cfg.model, 128)
    model = build_model(model_cfg, cfg.objective, seed=0).eval()
    tokenizer = Tokenizer(str(synthetic / "spm.model"), model_cfg.text.context_length)
    data = EvalSet(str(synthetic / "eval" / "shard-000000.tar"),
                   str(synthetic / "eval" / "classes.json"), 64, cfg.data.mean, cfg.data.std)
    assert data.has_masks and data.background_templates
    out = probes.run_probes(model, data, tokenizer, 16, torch.device("cpu"), torch.float32,
                            parts=(data, data))
    assert set(out) == {"linear_probe_top1", "linear_probe_l2", "dense_probe_miou",
                        "zeroshot_seg_miou"}
    assert all(0 <= out[k] <= 1 for k in out)
    # Fitted and scored on the same images, the probe beats chance (1/24) by far.
    assert out["linear_probe_top1"] > 0.3


def test_ignored_pixels_and_patches_count_for_nothing():
    target = torch.tensor([[1, 1, -1, -1]])
    assert probes.mean_iou(torch.tensor([[1, 1, 0, 2]]), target, 3) == 1.0
    masks = torch.full((2, 4, 4), -1)
    assert (probes.patch_labels(masks, 2, 3) == probes.IGNORE).all()
