"""What a user who clones the repository reads first holds: the README's links resolve inside the clone (the
design contract is docs/design.md, no `../shared`), and its two commands are what a fresh Debian root can
run as written (executable scripts, no `sudo`, which a fresh Debian 12 root does not have)."""

from __future__ import annotations

import os
import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_relative_links_resolve_inside_the_repository() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    relative = [link for link in links if "://" not in link]
    assert "docs/design.md" in relative
    for link in relative:
        target = (REPO / link).resolve()
        assert target.is_relative_to(REPO) and target.exists(), link


def test_the_run_commands_need_no_sudo() -> None:
    block = README.split("## Run it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].split() for line in block.strip().splitlines()]
    assert [c[0] for c in commands] == ["scripts/demo", "scripts/test"]
    for command in commands:
        script = REPO / command[0]
        assert os.access(script, os.X_OK), script
        assert (
            "sudo " not in script.read_text() and "sudo " not in (REPO / "scripts" / "setup.sh").read_text()
        )
    assert "sudo scripts/" not in README
