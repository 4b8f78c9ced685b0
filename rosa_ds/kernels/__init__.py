"""Sparse kernels for the sparse adapter, apart from any training code.

``sparse_linear.sparse_linear`` is the one autograd entry point; it dispatches by device to a
backend (``torch_sparse`` on CPU; the Triton kernels plug in at the same point).
"""
