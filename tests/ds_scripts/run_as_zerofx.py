"""Run a DeepSpeed script on zerofx with only its import changed.

    torchrun --nproc_per_node 2 tests/ds_scripts/run_as_zerofx.py SCRIPT.py [script args...]

is the script's own run with `import zerofx; zerofx.as_deepspeed()` before its first line:
`import deepspeed` (and deepspeed.accelerator, ...) then gives zerofx. The script runs as
__main__ with its own path as sys.argv[0] and its folder first on sys.path, as `python
SCRIPT.py` would; the environment (torchrun's RANK, LOCAL_RANK, WORLD_SIZE, ...) is untouched.
"""
import os
import runpy
import sys

import zerofx

zerofx.as_deepspeed()

if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
