"""Triton kernels (the ``triton`` backend). Imported on first use: importing Triton is slow,
and ``TRITON_INTERPRET=1`` must be set before these modules are imported."""
