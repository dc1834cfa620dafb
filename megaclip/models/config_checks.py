"""The model section's checks that read other sections too (the objective, the evaluation,
the optimiser): pretrained weights, locks, layer decay, and what SigLIP's towers can serve.
Part of ``config.validate``."""
from __future__ import annotations

from megaclip.config import Config


INIT_PARTS = ("image", "text", "logit_scale")  # what model.init_from_towers may name


def validate_pretrained(cfg: Config, check) -> None:
    """model.init_from / init_from_towers / lock_*, optim.layer_decay."""
    m = cfg.model
    where = m.init_from.strip()
    check(not (where.startswith("hf-hub:") or "://" in where),
          f"model.init_from takes a local file or folder, not '{where}': megaclip reads no "
          f"network at run time; download it first (e.g. huggingface-cli download <repo> "
          f"--local-dir <folder>) and give that folder")
    unknown = [t for t in m.init_from_towers if t not in INIT_PARTS]
    check(not unknown and len(set(m.init_from_towers)) == len(m.init_from_towers),
          f"model.init_from_towers takes distinct names among {', '.join(INIT_PARTS)}; got "
          f"{list(m.init_from_towers)}")
    check(not m.init_from_towers or where,
          "model.init_from_towers needs model.init_from (the file to load them from)")
    for tower, key in (("image", "lock_image_unlocked_groups"),
                       ("text", "lock_text_unlocked_layers")):
        value = getattr(m, key)
        check(value >= 0, f"model.{key} must be >= 0, got {value}")
        check(not value or getattr(m, f"lock_{tower}"),
              f"model.{key} needs model.lock_{tower}=true (it unlocks the last groups of a "
              f"locked tower)")
    check(0 < cfg.optim.layer_decay <= 1,
          f"optim.layer_decay must be in (0, 1] (1: off), got {cfg.optim.layer_decay:g}")


def validate_towers(cfg: Config, check) -> None:
    """The towers' pooling options, and what a tower without a class token can serve."""
    v, t = cfg.model.vision, cfg.model.text
    check(v.pool in ("token", "map"), f"model.vision.pool must be token or map; got '{v.pool}'")
    check(t.pool in ("eot", "last"), f"model.text.pool must be eot or last; got '{t.pool}'")
    if v.pool == "map":
        from megaclip.objectives.passes import Passes
        check(cfg.objective.passes == Passes(full_views=1, caption=True),
              f"model.vision.pool=map has no class token, which objective.preset "
              f"'{cfg.objective.preset}' reads (masked views, a teacher, crops or caption "
              f"masking); use objective.preset=clip (objective.contrastive clip or siglip)")
        check(not cfg.eval.probes, "model.vision.pool=map has no class token for the probes to "
                                   "read: set eval.probes=false")
