"""The README stays true: its config table is the config, and every CLI command is documented."""

from pathlib import Path

from latentsd.cli import build_parser
from latentsd.config import config_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_config_table_matches_the_dataclasses():
    start = README.index("| --- | --- | --- |\n", README.index("<!-- config-table")) + len("| --- | --- | --- |\n")
    end = README.index("<!-- /config-table -->")
    assert README[start:end].strip() == config_table().strip(), "regenerate with latentsd.config.config_table()"


def test_every_cli_command_is_in_the_readme():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"latentsd {name}" in README, name
