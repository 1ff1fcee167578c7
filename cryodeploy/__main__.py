"""``python -m cryodeploy`` runs the command line."""

from cryodeploy.cli import main

main()
