"""Training entry point for `accelerate launch` (the same code as `latentsd train`).

    accelerate launch --config_file configs/accelerate/2cpu.yaml train_scripts/train.py \\
        --config configs/train/tiny.yaml data.dataset=data/tiny_imagefolder
"""

import sys

from latentsd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
