"""Training a cell's network on images: ``metad2a fit`` and the database's labels.

Owns: the training recipe and loop (``trainer``), a fit's run folder, resume and export
(``fit``), its data split and decoding (``fitdata``), its plots (``plots``) and the
database's many-cells-at-once training (``proxy``).

May import: ``data``, ``nb201`` and the root helpers.
"""
