"""``python -m toolkit``: the ``toolkit`` command (how ``toolkit chat`` starts ``toolkit serve``)."""

from toolkit.cli import main

main()
