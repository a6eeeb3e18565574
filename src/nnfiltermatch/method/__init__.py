"""The method: small pure functions on tensors (no nnU-Net import): pseudo-labels, views, uncertainty, the filter,
query scores.
"""
