import sys

from neo_jax.cli import main

sys.exit(main())
