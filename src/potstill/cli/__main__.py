"""``python -m potstill.cli``: the ``potstill`` command."""

from . import main

main()
