"""The DSPy integration under its documented name: ``from minima_llm.dspy_adapter import ...``.

Everything lives in :mod:`minima_llm.dspy`; see its docstring for retries and the
provider-batch seam. The names and ``__all__`` are that package's, so the two
cannot drift apart.
"""

from .dspy import *  # noqa: F403
from .dspy import __all__ as __all__
