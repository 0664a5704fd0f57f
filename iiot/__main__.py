"""``python -m iiot`` runs the ``iiot`` command."""

from iiot.cli import main

main()
