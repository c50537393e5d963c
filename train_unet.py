#!/usr/bin/env python
"""Train the text-conditioned U-Net. Filled in by issue #5."""
import sys

if __name__ == "__main__":
    print("error: train_unet.py is not implemented yet (issue #5)", file=sys.stderr)
    sys.exit(2)
