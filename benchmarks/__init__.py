"""The research harness's top floor: the ``train`` / ``bench`` / ``ablate`` command line
(:mod:`benchmarks.cli`), the comparisons (:mod:`benchmarks.bench`, :mod:`benchmarks.ablate`,
on :mod:`benchmarks.matrix` and :mod:`benchmarks.report`), their configs and committed results,
and one-off studies (``benchmarks/studies/``). It runs from a checkout of the repository."""
