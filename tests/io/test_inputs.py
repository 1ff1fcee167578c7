"""Input expansion: files, globs, folders and RELION micrograph STAR files (written with starfile)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryodeploy.errors import InputError
from cryodeploy.io.inputs import expand_inputs, read_star_micrographs
from cryodeploy.io.mrc import write_micrograph


@pytest.fixture
def project(tmp_path) -> Path:
    """A RELION-like project: MotionCorr/job002/Movies/*.mrc plus a stray text file."""
    movies = tmp_path / "MotionCorr" / "job002" / "Movies"
    movies.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.mrc", "a.mrc", "c.mrcs"):
        write_micrograph(movies / name, rng.standard_normal((40, 40)))
    (movies / "notes.txt").write_text("not a micrograph")
    return tmp_path


def _write_star(path: Path, names: list[str]) -> Path:
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographPixelSize": [0.885]})
    mics = pd.DataFrame({"rlnMicrographName": names, "rlnOpticsGroup": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    starfile.write({"optics": optics, "micrographs": mics}, path)
    return path


def test_files_globs_and_folders_keep_order_without_duplicates(project, monkeypatch) -> None:
    monkeypatch.chdir(project)
    movies = "MotionCorr/job002/Movies"
    got = expand_inputs([f"{movies}/b.mrc", movies, f"{movies}/*.mrc", f"./{movies}/a.mrc"])
    assert [p.name for p in got] == ["b.mrc", "a.mrc", "c.mrcs"]
    assert [p.name for p in expand_inputs([f"{movies}/[ac]*"])] == ["a.mrc", "c.mrcs"]


def test_missing_inputs_are_errors(project) -> None:
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(project / "nope.mrc")])
    with pytest.raises(InputError, match="pattern matches no files"):
        expand_inputs([str(project / "*.mrcz")])
    (project / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds no \.mrc or \.mrcs files"):
        expand_inputs([str(project / "empty")])


def test_star_relative_paths_resolve_against_the_project(project, monkeypatch, tmp_path_factory) -> None:
    names = ["MotionCorr/job002/Movies/a.mrc", "MotionCorr/job002/Movies/b.mrc"]
    star = _write_star(project / "CtfFind" / "job003" / "micrographs_ctf.star", names)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    expected = [project / n for n in names]
    assert expand_inputs([str(star)], project_dir=project) == expected
    # not in the working directory: found among the STAR file's parents
    assert [p.resolve() for p in expand_inputs([str(star)])] == [p.resolve() for p in expected]
    monkeypatch.chdir(project)
    assert [p.resolve() for p in expand_inputs([str(star)])] == [p.resolve() for p in expected]


def test_star_with_dotdot_and_absolute_entries(project) -> None:
    absolute = str(project / "MotionCorr" / "job002" / "Movies" / "c.mrcs")
    star = _write_star(project / "Select" / "job004" / "micrographs.star",
                       ["Select/../MotionCorr/job002/Movies/a.mrc", absolute])
    got = read_star_micrographs(star, project_dir=project)
    assert got[0] == project / "Select/../MotionCorr/job002/Movies/a.mrc" and got[0].exists()
    assert got[1] == Path(absolute)


def test_star_without_micrographs_table_or_malformed(project) -> None:
    parts = project / "particles.star"
    starfile.write({"particles": pd.DataFrame({"rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0]})}, parts)
    with pytest.raises(InputError, match="no table with rlnMicrographName"):
        expand_inputs([str(parts)])
    broken = project / "broken.star"
    broken.write_text("data_micrographs\nloop_\n_rlnMicrographName #1\n_rlnOpticsGroup #2\n"
                      "a.mrc\n\x00\x01 1 2 3\n")
    with pytest.raises(InputError, match=re.escape(str(broken))):
        expand_inputs([str(broken)])


def test_folders_of_movies_take_tiff_files_when_asked(tmp_path) -> None:
    """A folder gives its .mrc/.mrcs files; with the movie endings also its .tif/.tiff ones (any case)."""
    for name in ("b.tif", "a.mrcs", "c.TIFF", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.mrcs"]
    movies = (".mrc", ".mrcs", ".tif", ".tiff")
    assert [p.name for p in expand_inputs([str(tmp_path)], suffixes=movies)] == ["a.mrcs", "b.tif", "c.TIFF"]
    (tmp_path / "a.mrcs").unlink()
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: directory holds no .mrc or .mrcs files")):
        expand_inputs([str(tmp_path)])
    (tmp_path / "b.tif").unlink()
    (tmp_path / "c.TIFF").unlink()
    with pytest.raises(InputError, match=re.escape("directory holds no .mrc, .mrcs, .tif or .tiff files")):
        expand_inputs([str(tmp_path)], suffixes=movies)
