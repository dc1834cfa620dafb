import pytest

from megaclip.config import TrainConfig, load_config
from megaclip.engine.ds_config import merge_ds_config
from megaclip.errors import UserError


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(UserError, match=r"unknown config key 'train.stpes'.*valid keys here: steps"):
        load_config("clip_tiny_synthetic", ["train.stpes=10"])


def test_wrong_type_is_rejected():
    with pytest.raises(UserError, match="'train.steps' must be an int"):
        load_config("clip_tiny_synthetic", ["train.steps=ten"])


def test_precedence_cli_over_file_over_defaults():
    cfg = load_config("clip_tiny_synthetic", ["optim.lr=0.01", "data.crop_scale=[0.6,0.9]"])
    assert cfg.optim.lr == 0.01 and cfg.data.crop_scale == (0.6, 0.9)
    assert cfg.model.preset == "tiny"  # from the file
    assert cfg.optim.eps == 1e-8  # default


def test_base_file_is_extended():
    cfg = load_config("clip_vitl14")
    assert cfg.model.preset == "vit_l14" and cfg.optim.weight_decay == 0.5


def test_missing_config_lists_bundled_ones():
    with pytest.raises(UserError, match="clip_tiny_synthetic"):
        load_config("no_such_experiment")


def test_deepspeed_json_contradiction_is_an_error():
    train = TrainConfig(micro_batch_size=32, grad_accum_steps=2, grad_clip=1.0)
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=16.*train.micro_batch_size=32"):
        merge_ds_config({"train_micro_batch_size_per_gpu": 16}, train, world_size=2)
    with pytest.raises(UserError, match="train_batch_size=100"):
        merge_ds_config({"train_batch_size": 100}, train, world_size=2)
    with pytest.raises(UserError, match="'optimizer'"):
        merge_ds_config({"optimizer": {"type": "Adam"}}, train, world_size=2)
    ds = merge_ds_config({"gradient_clipping": 1.0, "train_batch_size": "auto"}, train, 2)
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 2


def test_exponent_without_dot_is_a_number():
    assert load_config("clip_tiny_synthetic", ["optim.lr=3e-3"]).optim.lr == 0.003


@pytest.mark.parametrize("override, message", [
    ("train.stop_signals=[SIGTERM,SIGBOGUS]", "unknown signal 'SIGBOGUS'"),
    ("train.requeue_signals=[SIGUSR2]", r"train.requeue_signals \['SIGUSR2'\] must be among"),
    ("train.max_skipped_steps_in_a_row=0", "max_skipped_steps_in_a_row must be >= 1"),
    ("train.keep_checkpoints=-1", "keep_checkpoints must be >= 0"),
    ("train.dist_timeout_min=0", "train.dist_timeout_min must be > 0"),
    ("train.universal_conversion_timeout_min=-1",
     "train.universal_conversion_timeout_min must be > 0"),
])
def test_run_safety_settings_are_checked(override, message):
    with pytest.raises(UserError, match=message):
        load_config("clip_tiny_synthetic", [override])
