"""zerofx-from-deepspeed: a DeepSpeed ZeRO checkpoint (stages 0-3) as a zerofx checkpoint.

    zerofx-from-deepspeed DS_CHECKPOINT_DIR OUT_DIR                 the tag `latest` names
    zerofx-from-deepspeed DS_CHECKPOINT_DIR OUT_DIR --tag global_step100

Carries the fp32 master weights, Adam's exp_avg and exp_avg_sq, the step counts, the loss
scaler, the LR scheduler's state, the client state and the model's persistent buffers into
OUT_DIR/<tag> (and OUT_DIR/latest); then ``engine.load_checkpoint(OUT_DIR)`` continues
training at any world size and ZeRO stage. Frozen parameters (zerofx checkpoints hold only
what the optimizer trains, and the buffers) go to OUT_DIR/<tag>_module_extras.pt: load them
with ``model.load_state_dict(torch.load(...), strict=False)`` before zerofx.initialize.
Needs neither deepspeed nor torch.distributed.
"""
from __future__ import annotations

import argparse
import sys

from zerofx.checkpoint.deepspeed_import import convert, extra_file
from zerofx.checkpoint.files import CheckpointError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="zerofx-from-deepspeed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ds_dir", metavar="DS_CHECKPOINT_DIR",
                   help="the directory DeepSpeed's save_checkpoint wrote to (or a tag in it)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the zerofx checkpoint directory to write")
    p.add_argument("--tag", help="the DeepSpeed tag (default: the one `latest` names)")
    p.add_argument("--drop-client-key", action="append", default=[], metavar="KEY",
                   help="leave this client_state entry out (one that is not plain data)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path, imported = convert(args.ds_dir, args.out_dir, tag=args.tag,
                                 drop_client_keys=tuple(args.drop_client_key))
    except CheckpointError as e:
        print(f"zerofx-from-deepspeed: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"zerofx-from-deepspeed: {e}; check the paths and their permissions",
              file=sys.stderr)
        return 2
    src = imported.source
    total = sum(t.numel() for t in imported.master.values())
    print(f"wrote {path}: {len(imported.master)} parameters, {total} elements (fp32 master, "
          f"exp_avg, exp_avg_sq), Adam step {imported.step}, global step "
          f"{imported.global_steps}, from DeepSpeed {src['deepspeed']} ZeRO stage "
          f"{src['zero_stage']} on {src['dp_size']} data-parallel ranks")
    if imported.buffers:
        print(f"buffers (DeepSpeed's DP rank 0's, restored by load_checkpoint): "
              f"{', '.join(sorted(imported.buffers))}")
    if imported.extra:
        print(f"wrote {extra_file(args.out_dir, path.name)}: {', '.join(sorted(imported.extra))}"
              f" (frozen parameters: load them with model.load_state_dict(..., "
              f"strict=False) before zerofx.initialize)")
    print(f"continue with engine.load_checkpoint({args.out_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
