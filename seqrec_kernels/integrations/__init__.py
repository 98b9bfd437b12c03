"""Integrations with recommendation frameworks, each an optional dependency imported
only by its own module (`seqrec_kernels.integrations.recbole` needs RecBole)."""
