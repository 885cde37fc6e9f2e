"""Triton kernels for the NSA operator; `videonsa.ops.triton_nsa` assembles them into an autograd function."""
