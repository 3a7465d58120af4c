#!/usr/bin/env python
"""Launch target for multi-process encoding: `accelerate launch scripts/encode_latents.py --data ... --out ...`.

Same options as `latentflow encode`; each process encodes its share and rank 0 writes the manifest.
"""

import argparse
import sys

from latentflow.commands.encode import add_arguments, config_from_args, report
from latentflow.data.encoder import encode_dataset
from latentflow.errors import LatentflowError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    try:
        return report(encode_dataset(config_from_args(args)))
    except (LatentflowError, FileNotFoundError) as error:
        print(f"encode_latents: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
