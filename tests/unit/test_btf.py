"""The BTF reader on a hand-built blob (the format of include/uapi/linux/btf.h) and on the running kernel."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from otel_kzt.agent.datapath import btf as btfmod
from otel_kzt.agent.datapath.btf import KIND_ENUM, KIND_FUNC, KIND_STRUCT, Btf
from otel_kzt.errors import KernelUnsupported
from tests.conftest import require


class Builder:
    """Writes a minimal BTF blob: header, type records, string table."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def name(self, text: str) -> int:
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", *, kflag: int = 0
    ) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name) if name else 0, info, size_or_type) + extra
        self.count += 1
        return self.count

    def blob(self) -> bytes:
        header = struct.pack(
            "<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return header + self.types + self.strings


def member(b: Builder, name: str, type_id: int, offset_bits: int) -> bytes:
    return struct.pack("<III", b.name(name) if name else 0, type_id, offset_bits)


@pytest.fixture
def sample() -> Btf:
    b = Builder()
    u16 = b.add("u16", btfmod.KIND_INT, 0, 2, struct.pack("<I", 16))
    u32 = b.add("u32", btfmod.KIND_INT, 0, 4, struct.pack("<I", 32))
    typedef = b.add("__u32", btfmod.KIND_TYPEDEF, 0, u32)
    char = b.add("char", btfmod.KIND_INT, 0, 1, struct.pack("<I", 8))
    ptr = b.add("", btfmod.KIND_PTR, 0, char)
    # struct { u16 network_header; u16 transport_header; } at offset 4 of an anonymous union
    inner = b.add(
        "", KIND_STRUCT, 2, 4, member(b, "network_header", u16, 0) + member(b, "transport_header", u16, 16)
    )
    union = b.add("", btfmod.KIND_UNION, 2, 4, member(b, "", inner, 0) + member(b, "headers", u32, 0))
    b.add(
        "sk_buff",
        KIND_STRUCT,
        4,
        24,
        member(b, "len", typedef, 0)
        + member(b, "", union, 32)
        + member(b, "head", ptr, 64)
        + member(b, "flag", u32, (1 << 24) | 128),
        kflag=1,
    )
    b.add(
        "bpf_prog_type",
        KIND_ENUM,
        2,
        4,
        struct.pack("<Ii", b.name("BPF_PROG_TYPE_XDP"), 6)
        + struct.pack("<Ii", b.name("BPF_PROG_TYPE_NETFILTER"), 32),
    )
    b.add("bpf_prog_test_run_nf", KIND_FUNC, 0, 0)
    # enum { SKB_GSO_TCPV4 = 1, SKB_GSO_DODGY = 2 }: kernel constants in an anonymous enum
    b.add(
        "",
        KIND_ENUM,
        2,
        4,
        struct.pack("<Ii", b.name("SKB_GSO_TCPV4"), 1) + struct.pack("<Ii", b.name("SKB_GSO_DODGY"), 2),
    )
    # struct inet_skb_parm_like { char cb[48]; }: an array's size is its element's times its count
    array = b.add("", btfmod.KIND_ARRAY, 0, 0, struct.pack("<III", char, u32, 48))
    b.add("cbs", KIND_STRUCT, 1, 48, member(b, "cb", array, 0))
    return Btf(b.blob())


def test_fields_through_anonymous_members(sample: Btf) -> None:
    assert sample.field("sk_buff", "len") == (0, 4)  # through a typedef
    assert sample.field("sk_buff", "network_header") == (4, 2)  # anonymous union -> anonymous struct
    assert sample.field("sk_buff", "transport_header") == (6, 2)
    assert sample.field("sk_buff", "head") == (8, 8)  # a pointer


def test_missing_and_bitfield_fields_are_clear_errors(sample: Btf) -> None:
    with pytest.raises(KernelUnsupported, match="no field data"):
        sample.field("sk_buff", "data")
    with pytest.raises(KernelUnsupported, match="no struct nf_hook_state"):
        sample.field("nf_hook_state", "hook")
    with pytest.raises(KernelUnsupported, match="bitfield"):
        sample.field("sk_buff", "flag")


def test_enums_and_presence(sample: Btf) -> None:
    assert sample.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") == 32
    assert sample.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NOPE") is None
    assert sample.enum_value("bpf_attach_type", "BPF_NETFILTER") is None
    assert sample.has_type(KIND_FUNC, "bpf_prog_test_run_nf")
    assert not sample.has_type(KIND_FUNC, "bpf_nf_link_attach")


def test_enumerators_of_anonymous_enums_and_array_sizes(sample: Btf) -> None:
    assert (sample.enumerator("SKB_GSO_TCPV4"), sample.enumerator("SKB_GSO_DODGY")) == (1, 2)
    assert sample.enumerator("BPF_PROG_TYPE_NETFILTER") == 32  # named enums too
    assert sample.enumerator("SKB_GSO_NOPE") is None
    assert sample.field("cbs", "cb") == (0, 48)


def test_not_btf() -> None:
    with pytest.raises(KernelUnsupported, match="magic"):
        Btf(b"\0" * 64)


def test_missing_file_says_no_btf(tmp_path: Path) -> None:
    with pytest.raises(KernelUnsupported, match="kernel has no BTF"):
        btfmod.kernel_btf(tmp_path / "vmlinux")


def test_running_kernel_has_what_the_datapath_reads() -> None:
    require(btfmod.VMLINUX_BTF.exists(), "no kernel BTF on this machine")
    kernel = btfmod.kernel_btf()
    assert kernel.field("sk_buff", "len")[1] == 4
    assert kernel.field("sk_buff", "network_header")[1] == 2
    assert kernel.field("sk_buff", "head")[1] == 8
    assert kernel.field("sk_buff", "cb")[1] == 48
    assert kernel.enumerator("SKB_GSO_TCPV4") == 1  # what count.h's wire-exact rule tests


def test_probe_refuses_a_kernel_without_netfilter_links(sample: Btf) -> None:
    from otel_kzt.agent.datapath import netfilter, probe

    with pytest.raises(KernelUnsupported, match="no netfilter BPF programs/links"):
        probe.probe(netfilter.MODE, sample)  # has BPF_PROG_TYPE_NETFILTER but no BPF_NETFILTER attach type


def test_probe_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from otel_kzt.agent.datapath import probe
    from otel_kzt.errors import BccMissing, PrivilegeError

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(PrivilegeError, match="needs root"):
        probe.require_root()
    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc -> ImportError
    with pytest.raises(BccMissing, match="python3-bpfcc"):
        probe.require_bcc()


def test_the_absent_seam_hides_named_enumerators_from_the_mode_checks_only(
    sample: Btf, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otel_kzt.agent.datapath import probe

    monkeypatch.delenv(probe.ABSENT_ENV, raising=False)
    assert probe.as_checked(sample) is sample
    monkeypatch.setenv(probe.ABSENT_ENV, "BPF_PROG_TYPE_NETFILTER,,SKB_GSO_TCPV4")
    seen = probe.as_checked(sample)
    assert seen.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") is None
    assert seen.enum_value("bpf_prog_type", "BPF_PROG_TYPE_XDP") == 6
    assert seen.field("sk_buff", "len") == (0, 4)  # everything else reads as before
    assert sample.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") == 32  # the original is untouched
