"""``python -m suder`` (and ``accelerate launch -m suder run ...``)."""

import sys

from .cli import main

sys.exit(main())
