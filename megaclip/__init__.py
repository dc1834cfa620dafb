"""megaclip: pretraining of CLIP-family vision-language models on DeepSpeed ZeRO-3."""
__version__ = "0.1.0"
