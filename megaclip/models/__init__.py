from megaclip.models.build import build_model  # noqa: F401
from megaclip.models.presets import PRESETS, resolve_model_config  # noqa: F401
