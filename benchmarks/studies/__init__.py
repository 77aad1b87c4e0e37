"""One-off measurements behind the README's *Measured* section: run each from the checkout with
``python -m benchmarks.studies.<name> --help``."""
