// Ahead-of-time compiled Triton kernels inside the ORT CUDA library: the same kernels torch-fast launches
// (mambadeploy/kernels), compiled by `plugins/ort/aot_table.py` to cubin for the GPU at hand and handed to this library
// through its C entry points (below); the ORT ops look them up by key and launch them through the CUDA driver API.
//
// Key: "<role>|<dtype>|<name>=<value>,..." with the names sorted; `aot_table.kernel_key` writes the same string. A key
// may hold several variants, each for a range [lo, hi] of a size the op knows at run time (pairs for the MoE GEMMs,
// sequence length for the scan): the launch configs' regimes, decided in Python. An op that finds no kernel for its key
// and size runs its hand-written CUDA kernel instead (counted as a fallback).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mambadeploy_aot {

struct Kernel;  // a registered variant: cubin, entry name, threads, shared memory, launch metadata

using Dims = std::vector<std::pair<std::string, int64_t>>;
std::string Key(const char* role, const char* dtype, Dims dims);

// The variant of `key` whose range holds `size`, or nullptr (no kernel registered, or AOT launches turned off).
const Kernel* Find(const std::string& key, int64_t size);

// A launch-metadata value (a constexpr of the compiled variant, e.g. "BLOCK_M"); throws when the variant lacks it.
int64_t Meta(const Kernel* k, const char* name);

// Launch on `stream` with `args` = addresses of the kernel's parameters in order (pointers as 64-bit values, int32
// scalars); the implicit parameters Triton appends are passed as null. Returns nullptr or an error message.
const char* Launch(const Kernel* k, unsigned gx, unsigned gy, unsigned gz, std::vector<void*> args, void* stream);

void CountFallback();  // an op ran its hand-written kernel although AOT launches are on

}  // namespace mambadeploy_aot
