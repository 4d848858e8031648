"""Provisioning benchmark on emulated boards: `python -m bench.provision --out bench/results`.

Writes provision.json with
  provision_one_s            one factory-blank board: flash (ROM download mode over
                             rfc2217), deploy, key, registry, verified self-test
  provision_four_parallel_s  four blank boards in one `provision --port x4` run
  reprovision_s              the same command again on the provisioned board (a no-op)
plus the flash share of the single run, the parallel/single ratio and whether the
targets hold (four <= 1.5 x one, re-run <= 5 s). Times are wall-clock of the real
CLI process, as a technician would wait for it. esptool over pyserial's RFC 2217
client costs ~0.2 s per ROM command, which dominates the flash step here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.output import save
from citynode.testing.emulator import start_emulator
from citynode.testing.provisioning import (
    cli,
    firmware_tree,
    make_image,
    password_file,
    provision_args,
)


def _timed(args: list[str]) -> tuple[float, dict]:
    started = time.monotonic()
    run = cli(*args, timeout=600)
    elapsed = time.monotonic() - started
    if run.code != 0:
        raise SystemExit(f"provision failed ({run.code}):\n{run.stdout[-4000:]}\n{run.stderr}")
    flash = [e for e in run.events if e["step"] == "flash" and e["state"] in ("start", "done")]
    flash_s = (max(e["time"] for e in flash) - min(e["time"] for e in flash)) if flash else 0.0
    return elapsed, {"result": run.result, "flash_s": flash_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.provision", description=__doc__)
    parser.add_argument("--out", default="bench/results", help="directory for provision.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run for make test: one board and its re-run, no parallel "
                             "run (its keys are null)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cn-bench-provision-") as tmp_name:
        tmp = Path(tmp_name)
        fw, pw, image = firmware_tree(tmp), password_file(tmp), make_image(tmp)
        (tmp / "one").mkdir()
        (tmp / "four").mkdir()
        one = start_emulator(tmp / "one", blank=True)
        four = None if args.quick else start_emulator(tmp / "four", count=4, blank=True)
        four_s, four_info = None, None
        try:
            single = provision_args([one.boards[0].url], tmp / "fleet", fw, pw, image)
            one_s, one_info = _timed(single)
            again_s, again_info = _timed(single)
            assert again_info["result"]["unchanged"], "the re-run changed something"
            if four is not None:
                parallel = provision_args([b.url for b in four.boards], tmp / "fleet", fw, pw,
                                          image)
                four_s, four_info = _timed(parallel)
        finally:
            one.stop()
            if four is not None:
                four.stop()
    results = {
        "provision_one_s": round(one_s, 2),
        "provision_four_parallel_s": round(four_s, 2) if four_s else None,
        "reprovision_s": round(again_s, 2),
        "flash_one_s": round(one_info["flash_s"], 2),
        "parallel_ratio": round(four_s / one_s, 2) if four_s else None,
        "per_board_parallel_s": ([b["seconds"] for b in four_info["result"]["boards"]]
                                 if four_info else None),
        "quick": args.quick,
        "targets": {"four_parallel_le_1_5x_one": four_s <= 1.5 * one_s if four_s else None,
                    "reprovision_le_5_s": again_s <= 5.0},
        "setup": "emulated esp32-devkitc boards (citynode-emu), esptool over rfc2217, "
                 "firmware deployed as a ROMFS image (.mpy run in place)",
    }
    save(results, args.out, "provision")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
