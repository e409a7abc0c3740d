"""minima-llm benchmark suite: ``python -m benchmarks`` runs it all and writes ``docs/benchmarks.md``."""
