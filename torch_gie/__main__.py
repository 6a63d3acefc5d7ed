"""``python -m torch_gie``: the same as the ``torch-gie`` command."""
import sys

from .cli import main

sys.exit(main())
