"""The render tests import their helpers (``helpers_stitch``, ``helpers_animatic``) by name:
put this folder on sys.path whichever test file runs first, or alone."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
