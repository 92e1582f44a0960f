"""The container build file and the header-link helper the agent image runs as an init container.

No image can be built here (no container daemon, no registry), so the Containerfile is checked for what
the manifests rely on, and the helper script is run for real against this machine's header trees.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import require
from tests.integration import deploy_files as df

CONTAINERFILE = df.DEPLOY / "Containerfile"
LINK_HEADERS = df.DEPLOY / "otel-kzt-link-headers"


def _stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    text = CONTAINERFILE.read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_both_images_are_targets_on_debian_12() -> None:
    stages = _stages()
    assert {"agent", "enricher"} <= set(stages)
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:bookworm", CONTAINERFILE.read_text(), re.MULTILINE)
    assert "python3-bpfcc" in stages["agent"] and "linux-headers-" in stages["agent"]
    assert "python3-bpfcc" not in stages["enricher"], "the enricher needs no eBPF"


def test_copied_sources_exist() -> None:
    for line in CONTAINERFILE.read_text().splitlines():
        match = re.match(r"^COPY\s+(?!--from)(.+)\s+\S+$", line)
        if match:
            for source in match.group(1).split():
                assert (df.REPO / source).exists(), f"COPY {source}: missing in the repository"


def test_image_users_match_the_manifests() -> None:
    stages = _stages()
    enricher_pod = df.pod_spec(df.get("Deployment", "otel-kzt-enricher"))
    assert f"USER {enricher_pod['securityContext']['runAsUser']}:" in stages["enricher"]
    agent = df.container(df.get("DaemonSet", "otel-kzt-agent"), "agent")
    assert "USER 0" in stages["agent"] and agent["securityContext"]["runAsUser"] == 0


def test_init_container_runs_the_installed_helper() -> None:
    init = df.container(df.get("DaemonSet", "otel-kzt-agent"), "link-kernel-headers")
    assert init["command"][0] == "otel-kzt-link-headers"
    assert "/usr/local/bin/otel-kzt-link-headers" in _stages()["agent"]
    assert os.access(LINK_HEADERS, os.X_OK)


def test_link_helper_links_this_machines_tree(tmp_path: Path) -> None:
    require(bool(list(Path("/usr/src").glob("linux-headers-*-common"))), "no header tree (scripts/setup.sh)")
    done = subprocess.run(
        [str(LINK_HEADERS), str(tmp_path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    release = os.uname().release
    build, source = tmp_path / release / "build", tmp_path / release / "source"
    # What bcc needs: the generated headers (build) and the common tree (source).
    assert (build / "include" / "generated").is_dir()
    assert (source / "include" / "linux" / "kconfig.h").is_file()
    again = subprocess.run(
        [str(LINK_HEADERS), str(tmp_path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert again.returncode == 0 and build.resolve() == (tmp_path / release / "build").resolve()


def test_link_helper_fails_clearly_without_a_tree(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_KZT_HEADERS_ROOT": str(tmp_path / "kx-empty")}
    done = subprocess.run(
        [str(LINK_HEADERS), str(tmp_path / "modules")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert done.returncode == 1
    assert "no linux-headers-" in done.stderr


def test_the_images_install_the_built_wheel_not_the_source_tree() -> None:
    """A non-editable install (tests/kernel/test_wheel.py runs such a wheel on the kernel): no `-e`, the
    wheel pip built from the package, nothing of the tree left to import from."""
    build = _stages()["build"]
    assert re.search(r"pip wheel .*--no-deps -w (\S+) \.", build)
    assert re.search(r"pip install .*otel_kzt-\*\.whl", build)
    assert " -e " not in build and "--editable" not in build
