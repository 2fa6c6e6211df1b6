"""Build the ORT custom-op library from our own C++/CUDA sources, and find it: libmambadeploy_ort.so (CPU kernels, g++)
or libmambadeploy_ort_cuda.so (the CPU kernels plus CUDA kernels for ORT's CUDA provider, nvcc).

Headers: the onnxruntime wheels ship no C API headers. Debian packages them: `libonnxruntime-dev` (1.21.0, suite trixie)
holds onnxruntime_c_api.h / onnxruntime_cxx_api.h. `fetch_headers()` downloads that one package with apt-get (Debian's
own client; nothing is installed: the .deb is unpacked into a cache directory). The ORT C API is versioned and backward
compatible, so a library built against the 1.21 headers (ORT_API_VERSION 21) loads into onnxruntime 1.21 .. 1.32.
Set MAMBADEPLOY_ORT_INCLUDE to a directory holding the headers to skip the download.

    python -m mambadeploy.plugins.ort.build            # fetch headers if needed, compile, print the library path
    python -m mambadeploy.plugins.ort.build --cuda     # the CUDA build (needs nvcc; runs with onnxruntime-gpu)
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
CPU_SOURCES = ("ops_cpu.cc", "ops_cpu_decode.cc", "register.cc")
CUDA_SOURCES = (*CPU_SOURCES, "ops_cuda.cc", "ops_cuda_kernels.cu", "ops_cuda_decode.cc", "ops_cuda_decode_kernels.cu",
                "ops_cuda_moe_kernels.cu", "ops_cuda_aot.cc", "aot_launch.cc")
HEADERS = ("ops.h", "ops_cpu_common.h", "ops_cuda_kernels.h", "ops_cuda_glue.h", "ops_cuda_math.cuh", "ops_cuda_aot.h",
           "aot_launch.h", "opset_generated.h")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall")
# SASS for Hopper, PTX for sm_80 that the driver JIT-compiles on any newer GPU; override with MAMBADEPLOY_CUDA_ARCHS
# ("arch=compute_89,code=sm_89;...", nvcc -gencode values)
CUDA_ARCHS = tuple(a for a in os.environ.get("MAMBADEPLOY_CUDA_ARCHS", "arch=compute_90,code=sm_90;"
                                             "arch=compute_80,code=compute_80").split(";") if a)
HEADER_PACKAGE, HEADER_SUITE, HEADER_VERSION = "libonnxruntime-dev", "trixie", "1.21.0"
CACHE = Path(os.environ.get("MAMBADEPLOY_CACHE", Path.home() / ".cache" / "mambadeploy"))
LIBRARY_NAME = "libmambadeploy_ort.so"
CUDA_LIBRARY_NAME = "libmambadeploy_ort_cuda.so"


def header_dir() -> Path:
    env = os.environ.get("MAMBADEPLOY_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_cxx_api.h").exists():
            raise MambaDeployError(f"MAMBADEPLOY_ORT_INCLUDE={env} holds no onnxruntime_cxx_api.h")
        return Path(env)
    return CACHE / f"ort-headers-{HEADER_VERSION}"


def _debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (its configured sources), asked for another suite."""
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
              *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and words[1].rstrip("/").endswith("/debian"):
                return words[1]
            if words[:1] == ["deb"]:
                uri = next((w for w in words[1:] if not w.startswith("[")), "")
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    raise MambaDeployError("no Debian archive found in this machine's apt sources to fetch the ORT headers from; "
                           "set MAMBADEPLOY_ORT_INCLUDE to a directory holding onnxruntime_cxx_api.h")


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
        (tmp / "sources.list").write_text(f"deb [signed-by={keyring}] {_debian_mirror()} {HEADER_SUITE} main\n")
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


def _source_hash(sources, extra: str, include: Path) -> str:
    """Key of a build: our sources and headers, the compile command's flags, and the ORT header it compiled against."""
    h = hashlib.sha256(extra.encode())
    for name in (*sources, *HEADERS):
        h.update((HERE / name).read_bytes())
    h.update((include / "onnxruntime_c_api.h").read_bytes())
    return h.hexdigest()[:16]


def find_nvcc() -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    if not nvcc:
        raise MambaDeployError("the CUDA build of the ORT custom-op library needs nvcc (the CUDA toolkit, >= 12); set "
                               "NVCC or CUDA_HOME, or use the CPU library (build_library(cuda=False))")
    return nvcc


def compile_command(include: Path, out: Path, cuda: bool) -> list[str]:
    """The one compiler call that builds the library. CUDA: nvcc compiles the .cc files with the host compiler and the
    kernels for CUDA_ARCHS, links the CUDA runtime statically (no libcudart needed beside the library)."""
    if not cuda:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not cxx:
            raise MambaDeployError("no C++ compiler (g++) found to build the ORT custom-op library; install g++")
        return [cxx, *CXX_FLAGS, f"-I{include}", f"-I{HERE}", *[str(HERE / s) for s in CPU_SOURCES], "-o", str(out)]
    gencode = [a for arch in CUDA_ARCHS for a in ("-gencode", arch)]
    return [find_nvcc(), "-O3", "-std=c++17", "-shared", "--cudart", "static", "-Xcompiler",
            "-fPIC,-fvisibility=hidden,-Wall", "-DMAMBADEPLOY_WITH_CUDA", *gencode, f"-I{include}", f"-I{HERE}",
            *[str(HERE / s) for s in CUDA_SOURCES], "-ldl", "-o", str(out)]


def build_library(out_dir: Path | None = None, force: bool = False, cuda: bool = False) -> Path:
    """Compile the custom-op library (cached by a hash of the sources, headers and flags); returns its path.
    cuda=False: fp32 CPU kernels (g++, seconds). cuda=True: the same plus fp32/fp16/bf16 CUDA kernels for ORT's
    CUDA provider (nvcc, about a minute)."""
    from . import gen_opset

    if gen_opset.HEADER.read_text() != gen_opset.render():  # an entry changed since the header was generated
        raise MambaDeployError(f"{gen_opset.HEADER.name} does not match mambadeploy/opset.py: run "
                               "python -m mambadeploy.plugins.ort.gen_opset, then build again")
    include = fetch_headers()
    name = CUDA_LIBRARY_NAME if cuda else LIBRARY_NAME
    probe = compile_command(include, Path(name), cuda)
    flags = " ".join(probe[1:]).replace(str(include), "<ort>").replace(str(HERE), "<src>")  # paths differ per machine
    key = _source_hash(CUDA_SOURCES if cuda else CPU_SOURCES, flags, include)
    out_dir = Path(out_dir or CACHE / f"ort-ops-{key}")
    lib = out_dir / name
    if lib.exists() and not force:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.{os.getpid()}"
    r = subprocess.run(compile_command(include, tmp, cuda), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise MambaDeployError(f"compiling the ORT custom-op library ({name}) failed:\n{r.stderr[-3000:]}")
    os.replace(tmp, lib)
    return lib


def cuda_library_available() -> bool:
    """True when the CUDA build of the library is cached already or can be compiled here (nvcc + ORT headers)."""
    try:
        find_nvcc()
        header_dir()
        return True
    except MambaDeployError:
        return any(CACHE.glob(f"ort-ops-*/{CUDA_LIBRARY_NAME}"))


def register(session_options, library: Path | None = None, cuda: bool = False) -> Path:
    """Build (if needed) and register the library with an onnxruntime SessionOptions; returns its path. Use the CUDA
    build (cuda=True) for a session with the CUDA provider: it holds the CPU kernels too, in the same domain."""
    lib = Path(library) if library else build_library(cuda=cuda)
    session_options.register_custom_ops_library(str(lib))
    return lib


if __name__ == "__main__":
    print(build_library(force="--force" in sys.argv, cuda="--cuda" in sys.argv))
