"""DeepSpeed's ds_to_universal with every ``torch.load`` weights-only (``safe_load``), so that
converting a checkpoint for another world size runs no code from it. Same arguments:

    python -m megaclip.checkpoint.to_universal --input_folder CKPT --output_folder OUT

A refused file is ``error: checkpoint file ...`` on stderr and exit code 2. Its extraction
workers are forked (Linux), inheriting the checks; started any other way they still load
weights-only (the environment) with DeepSpeed's classes allowed (this module's import)."""
from __future__ import annotations

from megaclip.checkpoint.safe_load import allow_deepspeed_classes, weights_only_loads
from megaclip.errors import run_cli

allow_deepspeed_classes()


def main() -> int:
    from deepspeed.checkpoint import ds_to_universal
    with weights_only_loads():
        ds_to_universal.main(ds_to_universal.parse_arguments())
    return 0


if __name__ == "__main__":
    run_cli(main)
