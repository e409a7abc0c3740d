"""``python -m minima_llm.proxy``: the same as ``minimallm-proxy``."""

import sys

from ..cli import proxy_main

sys.exit(proxy_main())
