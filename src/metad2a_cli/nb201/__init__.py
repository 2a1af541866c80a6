"""Cells become networks: the NAS-Bench-201 search space.

Owns: ``Cell`` and the benchmark's index order (``cells``), the graph form the meta-models
read (``graph``), the network a cell defines (``network``), its closed-form cost
(``cost``) and ONNX / PyTorch export (``export``).

May import: the root helpers. Not ``data``: a network knows nothing of image folders.
"""
