"""Small CLI surfaces: `dotmoe info` and the bundled-asset locators."""

import json

import pytest

from dotmoe.cli import main
from dotmoe.paths import reference_data_file, reference_model_dir


def test_info_reports_bundled_model(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["reference_model"] == str(reference_model_dir())
    assert info["parameters"] == 9_965_824 and info["test_ppl"] < 40


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        reference_data_file("dev")
    assert reference_data_file("test").is_file()
