"""Adapters to third-party tools, each an optional dependency imported only by its own module.

``growmem.integrations.lm_eval``: lm-evaluation-harness (``pip install 'growmem[lm-eval]'``).
"""
