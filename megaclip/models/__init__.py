from megaclip.models.registry import PRESETS, build_model, resolve_model_config  # noqa: F401
