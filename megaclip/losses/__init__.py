from megaclip.losses.contrastive import ClipLoss, SigLipLoss, build_contrastive_loss  # noqa: F401
