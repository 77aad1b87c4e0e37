"""The research harness's middle floor: training methods with and without ``recon_aux``.

It runs from a checkout of the repository (it is not in the wheel) and imports only
``recon_aux`` and its own subpackages, each on a lower floor than what uses it:

- :mod:`adapters.engine` (one ``Trainer`` for every method), :mod:`adapters.config` (the typed
  run config) on :mod:`adapters.schema`, :mod:`adapters.checkpoint`,
  :mod:`adapters.distributed`, :mod:`adapters.progress`;
- :mod:`adapters.methods` (the method registry and one module per method) on
  :mod:`adapters.ops` (k-means, Sinkhorn-Knopp, projective warps);
- :mod:`adapters.data`, :mod:`adapters.backbones`, :mod:`adapters.evaluation`.
"""
