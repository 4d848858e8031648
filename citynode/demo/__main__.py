import sys

from citynode.demo.cli import main

sys.exit(main())
