"""Images become features: reading a labeled folder and encoding it.

Owns: the folder and list reader (``images``), EfficientNet-Lite0 (``efficientnet``,
``lite0``), the encoder (``encoder``) and the per-image feature cache (``features``).
A folder goes in; per-class (n, 1280) float32 features come out.

May import: the root helpers (``errors``, ``atomic``, ``paths``). Not ``nb201``: images
know nothing of cells.
"""
