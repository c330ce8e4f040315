"""`python -m gptjax ...` is the `gptjax` command."""

import sys

from gptjax.main import main

sys.exit(main())
