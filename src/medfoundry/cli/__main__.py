"""``python -m medfoundry.cli``: the same command as ``medfoundry`` (what torchrun and srun launch)."""

from medfoundry.cli import main

main()
