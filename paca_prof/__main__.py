"""`python -m paca_prof ...` (and `torchrun ... -m paca_prof run ...`): the paca-prof command."""

import sys

from paca_prof.cli import command

sys.exit(command())
