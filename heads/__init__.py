"""Frozen-encoder heads: what a distilled student is worth, task by task (`dune-heads`).

Features once (`heads.features`: an encoder's tokens on labelled data, written through
cache_format), heads many times (`heads.fit`: a grid of linear heads per learning rate, the
best kept on val), compared across encoders (`heads.compare`), pictured (`heads.pca`).
Encoders (`heads.encoders`): an exported student or run, a released DUNE checkpoint, any
registered teacher, any timm model. See docs/heads.md.
"""
