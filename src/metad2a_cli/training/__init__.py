"""Training a cell's network on images: ``metad2a fit`` and the database's labels.

Owns: the training recipe and loop (``recipe``, ``augment``, ``trainer``), a fit's run
folder, resume and export (``fit``), successive halving over several fits (``halving``),
its data split and decoding (``fitdata``), its plots (``plots``) and the database's
many-cells-at-once training (``ensemble``, ``labels``).

May import: ``data``, ``nb201`` and the root helpers.
"""
