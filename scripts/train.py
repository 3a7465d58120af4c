"""Launch target for accelerate: `accelerate launch [--config_file ...] scripts/train.py --config ... [--set k=v]`."""

from __future__ import annotations

import argparse
import sys

from latentflow.commands.train import add_arguments, run
from latentflow.errors import LatentflowError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args())
    except (LatentflowError, FileNotFoundError) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
