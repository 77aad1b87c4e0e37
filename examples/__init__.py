"""Examples of the two lines in the loops people run, and the library's demo.

They run from a checkout, from its root, as modules (the harness packages ``adapters`` beside
them provide data, backbones and a kNN check)::

    python -m examples.lightly_simclr --data-root ../shared/data --epochs 10
    python -m examples.demo --data-root ../shared/data
"""
