"""The datapath is compiled and loaded by a short-lived child (`otel_kzt.agent.datapath.loader`): the agent
process never maps libbcc/LLVM, still owns what was loaded, and gets the child's errors as its own classes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import loader
from otel_kzt.errors import ProgramLoadError
from tests.kernel.conftest import PIN_ROOT, Net, settle
from tests.kernel.test_datapath import UDP, key

pytestmark = pytest.mark.kernel

# A fresh interpreter (the test session may have imported bcc itself): start, count, report its mappings.
_AGENT = """
import json, sys, time
from otel_kzt.agent.datapath import Datapath, DatapathConfig
dp = Datapath(DatapathConfig(node_name="kd-loader", pin=False))
dp.start()
try:
    print("started", flush=True)
    sys.stdin.readline()  # the test sends traffic meanwhile
    flows = dp.snapshot().flows
    maps = open("/proc/self/maps").read()
    print(json.dumps({
        "libbcc": "libbcc" in maps, "llvm": "LLVM" in maps or "libclang" in maps, "bcc": "bcc" in sys.modules,
        "packets": {f"{k.src.hex()}>{k.dst.hex()}/{k.proto}/{k.dst_port}": c.packets
                    for k, c in flows.items()},
    }))
finally:
    dp.close()
"""


def test_agent_process_never_maps_libbcc_yet_counts(net: Net) -> None:
    net.drop_udp_at(net.pod_b)
    argv = netns.ns_argv(net.node, [sys.executable, "-c", _AGENT])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "started"
        net.traffic(net.pod_a, "udp", net.b4, 53, 4, 10)
        settle()
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["libbcc"], report["llvm"], report["bcc"]) == (False, False, False)
    k = key(net.a4, net.b4, UDP, dport=53)
    assert report["packets"][f"{k.src.hex()}>{k.dst.hex()}/{UDP}/53"] == 4


def test_a_load_error_in_the_child_is_the_same_error_class_here() -> None:
    # A map of 0 entries (DatapathConfig.validate() would refuse it): bcc fails in the child, and the
    # parent raises the child's ProgramLoadError.
    request = loader.LoadRequest("kd-loader-bad", False, PIN_ROOT, 0, 32768, 65535)
    with pytest.raises(ProgramLoadError, match=r"netfilter\.c"):
        loader.load(request)
