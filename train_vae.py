#!/usr/bin/env python
"""Train or fine-tune the VAE (AutoencoderKL). Filled in by issue #4."""
import sys

if __name__ == "__main__":
    print("error: train_vae.py is not implemented yet (issue #4)", file=sys.stderr)
    sys.exit(2)
