import sys

from mae_scale.cli import main

sys.exit(main())
