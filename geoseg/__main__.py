"""``python -m geoseg``: the same as the ``geoseg`` command."""

from geoseg.cli import main

main()
