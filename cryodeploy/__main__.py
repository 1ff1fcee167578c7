"""``python -m cryodeploy`` runs the command line."""

from .cli import main

main()
