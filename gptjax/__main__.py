"""`python -m gptjax ...` is the `gptjax` command."""

import sys

from gptjax.cli.main import main

sys.exit(main())
