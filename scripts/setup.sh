#!/usr/bin/env bash
# One-shot, idempotent set-up of a Debian 12 machine (as root) for otel-kzt:
#   - Debian packages: bcc (python3-bpfcc), a kernel header tree for bcc's compile step, iproute2, nftables,
#     Prometheus (+ promtool), bpftool, python3-venv, chromium (the web view's headless-browser test),
#     Node.js + npm (the OpenTelemetry JS clients in tests/clients/js, installed with `npm ci`);
#   - /lib/modules/$(uname -r)/{build,source} links when the running kernel ships no headers (bcc only needs
#     *a* tree: every struct offset the agent uses comes from the running kernel's BTF);
#   - bpffs mounted on /sys/fs/bpf (pinning);
#   - .venv with the PyPI dependencies, plus a link to Debian's bcc module (bcc is not on PyPI); the install
#     compiles the enricher's C extension (gcc, python3-dev), again when its source changes.
# Re-running it is cheap: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (eBPF, network namespaces, apt)" >&2
    exit 1
fi

pkgs=(python3 python3-venv python3-bpfcc iproute2 nftables prometheus bpftool linux-headers-amd64 procps
      iputils-ping openssl util-linux libcap2-bin chromium gcc python3-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js + npm for the OpenTelemetry JS clients the tests drive (any install that provides the commands).
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's prometheus package starts a server where an init system exists; tests run their own.

kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
    # Debian splits a header tree in two packages (-amd64 has the generated files, -common the rest):
    # bcc finds both halves only through the build and source links.
    arch_hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common_hdr=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$arch_hdr" ] || [ -z "$common_hdr" ]; then
        echo "setup: no kernel header tree under /usr/src (linux-headers-amd64)" >&2
        exit 1
    fi
    log "linking $kdir/build -> $arch_hdr, source -> $common_hdr"
    mkdir -p "$kdir"
    ln -sfn "$arch_hdr" "$kdir/build"
    ln -sfn "$common_hdr" "$kdir/source"
fi

if ! mountpoint -q /sys/fs/bpf; then
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi

py=/usr/bin/python3
venv=$root/.venv
stamp=$venv/.otel-kzt-setup
want=$(cat pyproject.toml otel_kzt/enricher/processing/*.c | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "creating virtualenv $venv"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
    echo "$want" >"$stamp"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_src=$("$py" -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
ln -sfn "$bcc_src" "$site/bcc"
"$venv/bin/python" -c 'import bcc' || { echo "setup: Debian bcc does not import in $venv" >&2; exit 1; }

# The OpenTelemetry JS OTLP exporters (tests/clients/js), exactly as locked, again when the lock changes.
js=$root/tests/clients/js
js_stamp=$js/node_modules/.otel-kzt-setup
js_want=$(sha256sum "$js/package-lock.json" | cut -c1-16)
if [ "$(cat "$js_stamp" 2>/dev/null)" != "$js_want" ]; then
    log "installing the OpenTelemetry JS clients (npm ci in tests/clients/js)"
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$js_want" >"$js_stamp"
fi
