"""Convert MAE-HiViT checkpoints (mmpretrain's, and the original HiViT repository's) into Hugging Face
`from_pretrained` folders:

    python convert_checkpoint.py --checkpoint mae_hivit-base.pth --output_dir hivit-mae-base

The converter lives in the package `hivit_mae_tools.conversion` (`python convert_checkpoint.py --help` lists the
options); this file is its entry point from a clone and, as `convert_checkpoint:main`, after `pip install`.
"""

import sys

from hivit_mae_tools.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
