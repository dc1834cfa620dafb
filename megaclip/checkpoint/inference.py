"""A checkpoint as a model for evaluation or export: its resolved config and fp32 weights."""
from __future__ import annotations

import os

from megaclip.checkpoint.io import CONFIG_FILE, consolidate
from megaclip.errors import UserError


def checkpoint_config(tag_dir: str):
    """The resolved config a checkpoint was trained with."""
    from megaclip.config import config_from_dict
    import yaml
    path = os.path.join(tag_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"'{tag_dir}' has no {CONFIG_FILE}; is it a megaclip checkpoint?")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def load_for_inference(tag_dir: str):
    """(model in eval mode with fp32 weights, resolved config) from a checkpoint directory."""
    from megaclip.models.build import build_model
    cfg = checkpoint_config(tag_dir)
    model = build_model(cfg.model, cfg.objective, seed=0)
    missing, unexpected = model.load_state_dict(consolidate(tag_dir), strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {tag_dir} does not match its config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model.eval(), cfg
