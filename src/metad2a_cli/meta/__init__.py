"""Meta-learning and search: turning (dataset, cell, accuracy) records into a search.

Owns: the meta-training database (``db``), the set encoder, generator and predictor
(``models``), meta-training (``train``), checkpoints and their Hub download (``weights``,
``checkpoint``, ``modelcard``, ``sizes``), the torch-free search engine (``engine``,
``search``) and saved search runs (``runs``).

May import: ``training``, ``data``, ``nb201`` and the root helpers.
"""
