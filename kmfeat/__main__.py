"""`python -m kmfeat` is the `kmfeat` command."""
from .cli import main

main()
