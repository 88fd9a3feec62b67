"""Can this output path be written? (:mod:`gradguard._paths`)."""

from __future__ import annotations

import pytest

from gradguard import _paths


def test_paths_helpers(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    assert _paths.output_file(file, name="o") == file  # replaced when written
    assert _paths.output_file(tmp_path, name="o", default_name="r.html") == tmp_path / "r.html"
    assert _paths.output_file(str(tmp_path / "n") + "/", name="o", default_name="r.html") \
        == tmp_path / "n" / "r.html"
    assert _paths.output_dir(tmp_path / "a" / "b", name="o") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing is created
    with pytest.raises(ValueError, match=r"'o' .* is a directory; give a file name"):
        _paths.output_file(tmp_path, name="'o'")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        _paths.output_dir(file, name="o")
    with pytest.raises(ValueError, match="must be a path"):
        _paths.output_file("  ", name="o")
    with pytest.raises(TypeError, match="o must be a path, got int 3"):
        _paths.output_dir(3, name="o")
    assert _paths.names_directory(tmp_path) and _paths.names_directory("nowhere/")
    assert not _paths.names_directory(file) and not _paths.names_directory("nowhere")
