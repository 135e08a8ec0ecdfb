"""zerofx-consolidate: one fp32 state dict from a sharded zerofx checkpoint.

    zerofx-consolidate CKPT_DIR -o model.pt              the tag `latest` names
    zerofx-consolidate CKPT_DIR --tag global_step100 -o model.pt

Writes {parameter name: fp32 tensor} from the fp32 master shards (not the compute-dtype
weights), so ``model.load_state_dict(torch.load("model.pt"), strict=False)`` restores the
trained parameters at full precision. Needs no torch.distributed and no model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zerofx.checkpoint.files import (CheckpointError, full_state, resolve_tag, with_aliases,
                                     write_atomically)


def consolidate(ckpt_dir, out, *, tag=None, echo=print) -> dict[str, torch.Tensor]:
    """Assemble the full fp32 master of ``ckpt_dir``/``tag`` and save it to ``out``."""
    if not str(out) or Path(out).name in ("", ".", ".."):
        raise CheckpointError(f"-o {str(out)!r} is not a file name; pass the file to write, "
                              f"e.g. -o model.pt")
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"cannot write {out}: it is a directory; pass a file path "
                              f"inside it, e.g. -o {out / 'model.pt'}")
    if not out.parent.is_dir():  # fail before reading what may be gigabytes of shards
        raise CheckpointError(f"cannot write {out}: {out.parent} is not a directory; create "
                              f"it or pick another -o path")
    path = resolve_tag(ckpt_dir, tag)
    if path is None:
        raise CheckpointError(f"{Path(ckpt_dir) / 'latest'} does not exist; pass --tag "
                              f"(the tag directories in {ckpt_dir})")
    state = with_aliases(path, full_state(path, "master", on_file=lambda f: echo(f"read {f}")))
    # never a half-written output, nor one written through a symlink planted at a temp name
    write_atomically(out, lambda f: torch.save(state, f), "; pick another -o path")
    total = sum(t.numel() for t in {id(t): t for t in state.values()}.values())
    echo(f"wrote {out}: {len(state)} parameters, {total} elements (fp32) from {path}")
    return state


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="zerofx-consolidate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", help="the directory save_checkpoint wrote to")
    p.add_argument("--tag", help="the checkpoint tag (default: the one `latest` names)")
    p.add_argument("-o", "--output", required=True, help="where to write the state dict")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        consolidate(args.ckpt_dir, args.output, tag=args.tag)
    except CheckpointError as e:
        print(f"zerofx-consolidate: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a directory that cannot be listed: no traceback for that
        print(f"zerofx-consolidate: {e}; check the paths and their permissions",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
