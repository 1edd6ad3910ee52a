import sys

from persona_steering.cli import main

sys.exit(main())
