"""Shared command-line tooling of the HiViT-MAE scripts: error reporting (`cli`), safe output folders (`outputs`),
image decoding and checking (`images`) and Trainer helpers (`training`)."""
