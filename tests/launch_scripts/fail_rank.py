"""A job where one rank fails while the others keep running, for the launcher's stop tests.

    fail_rank.py OUT_DIR FAILING_RANK

Each rank writes its pid to OUT_DIR/pid.<rank>. The failing rank waits until every rank has
done so (so the test knows every pid), then exits with code 3; the others sleep, standing in
for ranks stuck in a collective, until the launcher stops them. FAILING_RANK -1: none fails.
"""
import os
import sys
import time


def main(out_dir: str, failing_rank: int) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(os.path.join(out_dir, f"pid.{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(out_dir, f"pid.{rank}.tmp"), os.path.join(out_dir, f"pid.{rank}"))
    if rank != failing_rank:
        time.sleep(120)
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(out_dir, f"pid.{r}")) for r in range(world)):
            break
        time.sleep(0.05)
    print(f"rank {rank} failing on purpose", flush=True)
    sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
