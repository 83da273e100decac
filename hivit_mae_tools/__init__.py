"""What the HiViT-MAE commands share (each root command keeps only its own task): error reporting (`cli`), safe output
folders (`outputs`), Trainer plumbing (`training`), data loading (`data`, `images`, `pretraining_data`,
`sample_images`), the image processor (`preprocessing`), `config_overrides`, the fine-tuning recipes
(`finetune_recipes`), reconstruction figures (`reconstruction`) and the converter (`conversion`). The package imports
no root command."""
