"""Distillation for graph convolutional networks (Yang et al. 2020, the local structure preserving module).

``graphs``: inductive node-classification graphs kd generates (no download); ``models``: dense
GCNs; ``lsp``: the LSP loss, a pure function of node features and edges; ``distill``: teacher,
CE student and LSP student trained and compared (``kd graph``).
"""
