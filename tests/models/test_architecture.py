"""The towers' architecture options (CLIP's ln_pre, the MLP activation) reach every export."""
import pytest
import timm
import torch

from megaclip.checkpoint import convert
from megaclip.config import ModelConfig, ObjectiveConfig, VisionConfig
from megaclip.models import build_model, resolve_model_config


def tiny(**kw):
    cfg = resolve_model_config(ModelConfig(preset="tiny", **kw), vocab_size=64)
    model = build_model(cfg, ObjectiveConfig(), seed=0).eval()
    with torch.no_grad():  # non-trivial norms, so that a missing or misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return cfg, model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_pre_norm_and_activation_match_open_clip_and_timm(act):
    import open_clip
    cfg, model = tiny(vision=VisionConfig(pre_norm=True), act=act)
    assert isinstance(model.visual.trunk.norm_pre, torch.nn.LayerNorm)
    state = model.state_dict()
    oc_cfg = convert.open_clip_model_config(cfg, "clip", eos_id=2, pad_id=0)
    oc_cfg.pop("custom_text")
    ours = open_clip.model.CustomTextCLIP(**oc_cfg).eval()
    ours.load_state_dict(convert.open_clip_state(state, cfg), strict=True)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(3, 64, (2, 32))
    tokens[:, 0], tokens[0, 9], tokens[1, 20] = 1, 2, 2
    tokens[0, 10:], tokens[1, 21:] = 0, 0
    with torch.no_grad():
        out = model(images=images, tokens=tokens, eot=torch.tensor([9, 20]))
        torch.testing.assert_close(ours.encode_image(images, normalize=True),
                                   out["image_features"], rtol=0, atol=1e-5)
        # open_clip's final text norm has the blocks' eps (1e-6), megaclip's 1e-5
        torch.testing.assert_close(ours.encode_text(tokens, normalize=True),
                                   out["text_features"], rtol=0, atol=1e-4)
        arch, kwargs = convert.timm_create_kwargs(cfg)
        vit = timm.create_model(arch, **kwargs).eval()
        vit.load_state_dict(convert.timm_vision(state), strict=True)
        torch.testing.assert_close(vit.forward_features(images),
                                   model.visual.trunk(images), rtol=0, atol=1e-6)


def test_gelu_tanh_is_refused_by_the_open_clip_export_and_unknown_names_by_the_config():
    from megaclip.config import load_config
    from megaclip.errors import UserError
    cfg, _ = tiny(act="gelu_tanh")
    with pytest.raises(ValueError, match="gelu_tanh"):
        convert.open_clip_model_config(cfg, "clip", eos_id=2, pad_id=0)
    with pytest.raises(UserError, match="model.act must be one of gelu, quick_gelu, gelu_tanh"):
        load_config(None, ["model.act=relu"])


def test_defaults_build_the_model_as_before():
    _, model = tiny()
    assert isinstance(model.visual.trunk.norm_pre, torch.nn.Identity)
    assert type(model.visual.trunk.blocks[0].mlp.act) is torch.nn.GELU
    assert type(model.text.blocks[0].mlp.act) is torch.nn.GELU
