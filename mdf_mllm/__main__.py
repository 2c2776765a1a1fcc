"""`python -m mdf_mllm ...` is the `mdf-mllm` command."""

import sys

from mdf_mllm.cli import main

sys.exit(main())
