// Stand-in for the CUDA driver functions the MoE launcher resolves from libcuda.so.1, built as a
// file of that name in its own folder: tests put the folder on LD_LIBRARY_PATH, so the launcher
// (and the plugin) load it the way they load the real driver. It keeps a book of loaded modules
// and launches; it runs no kernel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace standin {

struct CudaLaunch {
    std::string function;
    unsigned grid[3];
    unsigned block;
    unsigned shared_bytes;
    void* stream;
};

struct CudaState {
    // What the "device" reports; tests change it between calls.
    int cc_major = 9, cc_minor = 0;
    int shared_optin = 227 * 1024;
    int driver_version = 13000;   // cuDriverGetVersion: CUDA 13.0 (R580)
    uintptr_t current_context = 0x1000;  // 0: no current context
    int fail_load_at = -1;        // cuModuleLoadData fails on this call (0-based, counted from the start)
    // The book.
    int load_calls = 0;
    int loaded = 0, unloaded = 0, unload_errors = 0;
    int cubins = 0, ptx = 0;
    std::vector<std::string> missing_functions;  // names cuModuleGetFunction did not find in the image
    std::vector<CudaLaunch> launches;
    std::vector<uintptr_t> module_contexts;      // per loaded module: the context it was loaded in
};

}  // namespace standin

// Exported by the stand-in library: its state (find it with dlsym on libcuda.so.1).
extern "C" standin::CudaState* mixexport_standin_cuda_state();
