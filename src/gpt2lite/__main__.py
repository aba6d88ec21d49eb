"""``python -m gpt2lite`` runs the command line."""

import sys

from gpt2lite.cli import main

sys.exit(main())
