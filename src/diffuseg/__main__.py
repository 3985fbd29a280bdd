import sys

from diffuseg.cli import main

sys.exit(main())
