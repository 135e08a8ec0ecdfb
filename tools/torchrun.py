"""torchrun (``torch.distributed.run``) that exits with the failed rank's own exit code.

    python -m zerofx.tools.torchrun --nnodes=2 ... train.py      # same arguments as torchrun

torchrun exits 1 whenever a rank fails, so a multi-node launch could not report *how* it
failed; this runs torchrun's own ``main`` in-process and turns its ChildFailedError into
the first failed rank's code (128 + N for a rank killed by signal N). torchrun's failure
report is still printed.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 - code if code < 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
