"""``recon-aux``: the library's console script.

    recon-aux --version                       # the installed version
    recon-aux train|bench|ablate|summary ARGS ...   # the research harness, from a checkout

The installed package is the add-on only (the two lines, :func:`recon_aux.attach`). The research
harness (the methods, the training engine, the benchmarks: the ``adapters`` and ``benchmarks``
packages) is not installed; it runs from a checkout of the repository. This module is the only
place where the library hands over to the harness, and it does so by name at run time: it finds
the checkout, puts it first on ``sys.path`` and calls ``benchmarks.cli.main(argv)``. It never
imports the harness at module level, so ``import recon_aux`` never does either.

The checkout is the one that holds the imported ``recon_aux`` package (an editable install, as
``make venv`` makes), so the harness that runs is the one beside the library it imports, and a
folder the command merely runs in cannot put its own code in its place. Failing that (the
package installed from a wheel), it is the nearest folder at or above the current directory
that holds ``benchmarks/cli.py`` next to ``adapters/``. Outside a checkout the harness commands
print one line that says so and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

__all__ = ["main", "find_checkout", "HARNESS_COMMANDS"]

#: The commands the harness runs (``benchmarks/cli.py``).
HARNESS_COMMANDS = ("train", "bench", "ablate", "summary")
REPOSITORY = "https://github.com/recon-aux/recon-aux"
USAGE = f"""usage: recon-aux [--version] {{{','.join(HARNESS_COMMANDS)}}} ...

  --version   print the version of recon-aux
  train       one run of a method, base or +recon (YAML config)
  bench       methods x {{base, +recon}} x seeds, with reference rows
  ablate      the auxiliary objective's knobs, one at a time
  summary     the verdict table over the bench results folders

train, bench, ablate and summary run from a checkout of {REPOSITORY}
(recon-aux COMMAND --help there for their options)."""


def find_checkout(start: Path | None = None, package_dir: Path | None = None) -> Path | None:
    """The checkout whose harness to run, or None.

    Args:
        start: Where to start looking upwards when the package is not in a checkout (default:
            the current directory).
        package_dir: The imported ``recon_aux`` package's folder (default: this module's); its
            parent is the checkout of an editable install, which comes first.
    """
    start = (start or Path.cwd()).resolve()
    package_dir = (package_dir or Path(__file__).parent).resolve()
    for folder in (package_dir.parent, start, *start.parents):
        if (folder / "benchmarks" / "cli.py").is_file() and (folder / "adapters").is_dir():
            return folder
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``recon-aux ARGV``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"recon-aux {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] not in HARNESS_COMMANDS:
        print(f"recon-aux: unknown command {args[0]!r}; commands: "
              f"{', '.join(HARNESS_COMMANDS)} (or --version)", file=sys.stderr)
        return 2
    checkout = find_checkout()
    if checkout is None:
        print(f"recon-aux: {args[0]} is part of the research harness, which runs from a checkout "
              f"of the repository (git clone {REPOSITORY}, then make venv), and there is no "
              f"checkout at or above {Path.cwd()}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(checkout))
    harness = importlib.import_module("benchmarks.cli")  # by name, at run time: see above
    found = Path(harness.__file__).resolve().parent.parent
    if found != checkout:
        print(f"recon-aux: the module benchmarks.cli was imported from {found}, not from the "
              f"checkout {checkout}; remove the other 'benchmarks' from the Python path",
              file=sys.stderr)
        return 2
    return harness.main(args)


if __name__ == "__main__":
    sys.exit(main())
