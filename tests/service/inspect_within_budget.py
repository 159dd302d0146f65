"""Inspect the ONNX model at argv[1] with a data segment of the interpreter's own plus argv[2] times the
file's size (tests/service/test_inspection.py): prints the layer count, or the error."""

from __future__ import annotations

import os
import resource
import sys

import onnx  # noqa: F401  (loaded before the budget is measured)

from service.inspection.checks import Limits, inspect_model


def main() -> None:
    path, factor = sys.argv[1], float(sys.argv[2])
    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData"))
    budget = own + int(factor * os.path.getsize(path))
    resource.setrlimit(resource.RLIMIT_DATA, (budget, budget))
    limits = Limits(
        max_bytes=1 << 31,
        max_decompressed_bytes=1 << 31,
        max_archive_members=8,
        max_dataset_arrays=8,
        allow_torch=False,
    )
    try:
        with open(path, "rb") as file:
            print(len(inspect_model(file, limits)["layers"]))
    except MemoryError:
        print("MemoryError")


if __name__ == "__main__":
    main()
