"""Make the example micrographs in this folder: three 768x768 crops of a real EPU micrograph.

Source: ``epu2.9_example.mrc`` from the test data of mrcfile 1.5.4 (BSD-3-Clause, see
``LICENSE_mrcfile.txt``), a 4096x4096 uint16 (MRC mode 6) integrated frame sum at 0.6666 A/pixel.
The crops keep mode 6 (the original counts, unchanged) and the voxel size; the FEI extended header
is dropped. Each crop's offset in the original is written into its MRC label. Reruns write
byte-identical files.

Usage (from the repository root)::

    python examples/make_examples.py PATH/TO/epu2.9_example.mrc

Get the original with::

    pip download --no-deps --no-binary :all: -d DIR mrcfile==1.5.4
    tar xzf DIR/mrcfile-1.5.4.tar.gz mrcfile-1.5.4/tests/test_data/epu2.9_example.mrc
"""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np

HERE = Path(__file__).resolve().parent
SIZE = 768
#: (name, row, column) of each crop's top-left corner in the 4096x4096 original.
CROPS = (("epu_crop_a", 512, 512), ("epu_crop_b", 1792, 2304), ("epu_crop_c", 3072, 1024))


def make_examples(source: Path, outdir: Path) -> list[Path]:
    """Write the crops of ``source`` into ``outdir``; return their paths."""
    with mrcfile.open(source, permissive=False) as mrc:
        data = np.asarray(mrc.data)
        voxel_size = mrc.voxel_size.copy()
    if data.dtype != np.uint16 or data.shape != (4096, 4096):
        raise SystemExit(f"{source}: found {data.dtype} {data.shape}, expected uint16 (4096, 4096)")
    paths = []
    for name, row, col in CROPS:
        path = outdir / f"{name}.mrc"
        with mrcfile.new(path, overwrite=True) as out:
            out.set_data(np.ascontiguousarray(data[row : row + SIZE, col : col + SIZE]))
            out.voxel_size = voxel_size
            out.header.nlabl = 0  # no time-stamped default label: reruns give the same bytes
            out.header.label[:] = b""
            out.add_label(f"crop rows {row}-{row + SIZE - 1} cols {col}-{col + SIZE - 1} of {source.name}")
            out.add_label("source: mrcfile 1.5.4 tests/test_data, BSD-3-Clause")
        paths.append(path)
    return paths


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_examples.py PATH/TO/epu2.9_example.mrc")
    source = Path(sys.argv[1])
    for path in make_examples(source, HERE):
        print(f"wrote {path.relative_to(HERE.parent)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
