import sys

from ray_app.cli import main

sys.exit(main())
