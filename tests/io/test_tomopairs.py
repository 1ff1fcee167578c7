"""Even/odd tomogram pairs: by file name, by folders, from a RELION 5 tomograms STAR file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryodeploy.errors import InputError
from cryodeploy.io.tomopairs import (
    TomoPair,
    expand_tomograms,
    pair_by_name,
    pair_folders,
    read_star_tomograms,
)


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        (folder / n).write_bytes(b"x")
        out.append(folder / n)
    return out


def test_pair_by_name_accepts_the_usual_spellings(tmp_path: Path) -> None:
    files = _touch(tmp_path, "a_even.mrc", "b_EVN.mrc", "a_odd.mrc", "b_ODD.mrc", "c.even.rec", "c.odd.rec")
    pairs = pair_by_name(files)
    assert pairs == [
        TomoPair("a", tmp_path / "a_even.mrc", tmp_path / "a_odd.mrc"),
        TomoPair("b", tmp_path / "b_EVN.mrc", tmp_path / "b_ODD.mrc"),
        TomoPair("c", tmp_path / "c.even.rec", tmp_path / "c.odd.rec"),
    ]


def test_pair_by_name_errors(tmp_path: Path) -> None:
    files = _touch(tmp_path, "a_even.mrc", "tomo.mrc", "b_odd.mrc")
    with pytest.raises(
        InputError, match=r"tomo.mrc: found no even/odd half in the name, expected NAME_even.mrc"
    ):
        pair_by_name(files)
    with pytest.raises(InputError, match=r"a_even.mrc: found no odd half beside it, expected a pair"):
        pair_by_name(files[:1])
    with pytest.raises(InputError, match=r"b_odd.mrc: found no even half beside it"):
        pair_by_name(files[2:])


def test_pair_folders(tmp_path: Path) -> None:
    _touch(tmp_path / "even", "t1.mrc", "t2.rec")
    _touch(tmp_path / "odd", "t1.mrc", "t2.rec")
    pairs = pair_folders(tmp_path / "even", tmp_path / "odd")
    assert [(p.name, p.even.name, p.odd.name if p.odd else None) for p in pairs] == [
        ("t1", "t1.mrc", "t1.mrc"),
        ("t2", "t2.rec", "t2.rec"),
    ]
    _touch(tmp_path / "odd", "t3.mrc")
    with pytest.raises(InputError, match=r"odd/t3.mrc: found no even half in .*even, expected pairs"):
        pair_folders(tmp_path / "even", tmp_path / "odd")
    _touch(tmp_path / "even", "t4.mrc")
    with pytest.raises(InputError, match=r"odd/t4.mrc: no such file, expected the odd half of"):
        pair_folders(tmp_path / "even", tmp_path / "odd")


STAR = """
# version 50001

data_global

loop_
_rlnTomoName #1
_rlnTomoTiltSeriesStarFile #2
{columns}
{rows}
"""


def _star(path: Path, columns: list[str], rows: list[list[str]]) -> Path:
    cols = "\n".join(f"_{c} #{i}" for i, c in enumerate(columns, 3))
    path.write_text(STAR.format(columns=cols, rows="\n".join("\t".join(r) for r in rows)) + "\n")
    return path


def test_relion5_tomograms_star_halves_and_singles(tmp_path: Path) -> None:
    _touch(tmp_path / "Tomograms" / "job010" / "tomograms", "rec_TS_01_half1.mrc", "rec_TS_01_half2.mrc")
    cols = [
        "rlnTomoReconstructedTomogram",
        "rlnTomoReconstructedTomogramHalf1",
        "rlnTomoReconstructedTomogramHalf2",
    ]
    base = "Tomograms/job010/tomograms/"
    star = _star(
        tmp_path / "Tomograms" / "job010" / "tomograms.star",
        cols,
        [
            [
                "TS_01",
                "ts/TS_01.star",
                base + "rec_TS_01.mrc",
                base + "rec_TS_01_half1.mrc",
                base + "rec_TS_01_half2.mrc",
            ]
        ],
    )
    (pair,) = read_star_tomograms(star)
    assert pair.name == "TS_01"
    assert (
        pair.even == tmp_path / base / "rec_TS_01_half1.mrc"
        and pair.odd == tmp_path / base / "rec_TS_01_half2.mrc"
    )
    single = _star(tmp_path / "single.star", cols[:1], [["TS_02", "x.star", "a/TS_02.mrc"]])
    assert [(p.name, p.even.name, p.odd) for p in read_star_tomograms(single)] == [
        ("TS_02", "TS_02.mrc", None)
    ]
    half = _star(tmp_path / "half.star", cols[:2], [["TS_02", "x.star", "a.mrc", "b.mrc"]])
    with pytest.raises(
        InputError,
        match=r"half.star: found rlnTomoReconstructedTomogramHalf1 without "
        r"rlnTomoReconstructedTomogramHalf2, expected both",
    ):
        read_star_tomograms(half)
    other = _star(tmp_path / "mics.star", ["rlnMicrographName"], [["a", "b", "c.mrc"]])
    with pytest.raises(InputError, match=r"mics.star: no table with rlnTomoReconstructedTomogram or "):
        read_star_tomograms(other)


def test_expand_tomograms_refuses_a_mix_of_pairs_and_singles(tmp_path: Path) -> None:
    _touch(tmp_path, "a_even.mrc", "a_odd.mrc", "b.rec")
    assert [
        p.name
        for p in expand_tomograms([str(tmp_path / "a_even.mrc"), str(tmp_path / "a_odd.mrc")], even_odd=True)
    ] == ["a"]
    assert [p.name for p in expand_tomograms([str(tmp_path)])] == ["a_even", "a_odd", "b"]
    star = _star(
        tmp_path / "t.star",
        ["rlnTomoReconstructedTomogramHalf1", "rlnTomoReconstructedTomogramHalf2"],
        [["a", "x.star", "a_even.mrc", "a_odd.mrc"]],
    )
    with pytest.raises(InputError, match=r"b.rec: a single tomogram among even/odd pairs"):
        expand_tomograms([str(star), str(tmp_path / "b.rec")])
