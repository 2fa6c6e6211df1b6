"""Build the ORT custom-op library (libmambadeploy_ort.so) from our own C++ sources, and find it.

Headers: the onnxruntime wheels ship no C API headers. Debian packages them: `libonnxruntime-dev` (1.21.0, suite trixie)
holds onnxruntime_c_api.h / onnxruntime_cxx_api.h. `fetch_headers()` downloads that one package with apt-get (Debian's
own client; nothing is installed: the .deb is unpacked into a cache directory). The ORT C API is versioned and backward
compatible, so a library built against the 1.21 headers (ORT_API_VERSION 21) loads into onnxruntime 1.21 .. 1.32.
Set MAMBADEPLOY_ORT_INCLUDE to a directory holding the headers to skip the download.

    python -m mambadeploy.plugins.ort.build            # fetch headers if needed, compile, print the library path
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ...errors import MambaDeployError

HERE = Path(__file__).resolve().parent
SOURCES = ("ops_cpu.cc",)
HEADER_PACKAGE, HEADER_SUITE, HEADER_VERSION = "libonnxruntime-dev", "trixie", "1.21.0"
CACHE = Path(os.environ.get("MAMBADEPLOY_CACHE", Path.home() / ".cache" / "mambadeploy"))
LIBRARY_NAME = "libmambadeploy_ort.so"


def header_dir() -> Path:
    env = os.environ.get("MAMBADEPLOY_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_cxx_api.h").exists():
            raise MambaDeployError(f"MAMBADEPLOY_ORT_INCLUDE={env} holds no onnxruntime_cxx_api.h")
        return Path(env)
    return CACHE / f"ort-headers-{HEADER_VERSION}"


def fetch_headers() -> Path:
    """The ORT headers, downloaded once from Debian (apt-get download libonnxruntime-dev from trixie) and unpacked."""
    dest = header_dir()
    if (dest / "onnxruntime_cxx_api.h").exists():
        return dest
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise MambaDeployError("ORT headers are needed to build the custom-op library and this machine has no apt-get "
                               "to fetch them (Debian package libonnxruntime-dev); set MAMBADEPLOY_ORT_INCLUDE to a "
                               "directory holding onnxruntime_cxx_api.h")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "lists" / "partial").mkdir(parents=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (tmp / "sources.list").write_text(
            f"deb [signed-by={keyring}] http://deb.debian.org/debian {HEADER_SUITE} main\n")
        opts = ["-o", f"Dir::Etc::SourceList={tmp / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={tmp / 'lists'}", "-o", "Debug::NoLocking=1"]
        for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", HEADER_PACKAGE]):
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0:
                raise MambaDeployError(f"fetching ORT headers failed ({' '.join(cmd[:1] + cmd[-2:])}): "
                                       f"{r.stderr.strip()[-300:]}; set MAMBADEPLOY_ORT_INCLUDE instead")
        deb = next(tmp.glob(f"{HEADER_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        src = tmp / "root" / "usr" / "include" / "onnxruntime"
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.with_name(dest.name + f".{os.getpid()}")
        shutil.copytree(src, staging)
        os.replace(staging, dest)  # atomic: a concurrent build sees all headers or none
    return dest


def _source_hash(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def build_library(out_dir: Path | None = None, force: bool = False) -> Path:
    """Compile the CPU custom-op library (cached by a hash of the sources and compiler flags); returns its path."""
    include = fetch_headers()
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall"]
    key = _source_hash(" ".join(flags) + str(include))
    out_dir = Path(out_dir or CACHE / f"ort-ops-{key}")
    lib = out_dir / LIBRARY_NAME
    if lib.exists() and not force:
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise MambaDeployError("no C++ compiler (g++) found to build the ORT custom-op library; install g++")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{LIBRARY_NAME}.{os.getpid()}"
    cmd = [cxx, *flags, f"-I{include}", *[str(HERE / s) for s in SOURCES], "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise MambaDeployError(f"compiling the ORT custom-op library failed:\n{r.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


def register(session_options, library: Path | None = None) -> Path:
    """Build (if needed) and register the library with an onnxruntime SessionOptions; returns its path."""
    lib = Path(library) if library else build_library()
    session_options.register_custom_ops_library(str(lib))
    return lib


if __name__ == "__main__":
    print(build_library(force="--force" in sys.argv))
