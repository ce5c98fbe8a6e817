"""Text-to-image from a model folder: the same code as `latentsd generate` (see README for the flags).

    python pipelines/text_to_image.py "a red circle on the left" --model DIR --out out.png
"""

import sys

from latentsd.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
