#include "cuda_standin.h"

#include <cuda.h>

#include <cstring>
#include <memory>
#include <set>

namespace {

standin::CudaState gState;

struct Function {
    std::string name;
};

struct Module {
    const unsigned char* image;
    size_t size;
    uintptr_t context;
    std::vector<std::unique_ptr<Function>> functions;  // die with the module, as the driver's do
};

std::set<Module*> gModules;
std::set<Function*> gFunctions;

// A cubin is an ELF file: its section headers end it, which gives its size. PTX is text.
size_t imageSize(const unsigned char* image, bool* is_cubin) {
    *is_cubin = std::memcmp(image, "\x7f" "ELF", 4) == 0;
    if (!*is_cubin) return std::strlen(reinterpret_cast<const char*>(image));
    uint64_t shoff = 0;
    uint16_t shentsize = 0, shnum = 0;
    std::memcpy(&shoff, image + 0x28, 8);
    std::memcpy(&shentsize, image + 0x3a, 2);
    std::memcpy(&shnum, image + 0x3c, 2);
    return shoff + static_cast<size_t>(shentsize) * shnum;
}

}  // namespace

extern "C" {

standin::CudaState* mixexport_standin_cuda_state() { return &gState; }

CUresult cuGetErrorString(CUresult error, const char** text) {
    *text = error == CUDA_ERROR_INVALID_IMAGE ? "device kernel image is invalid (stand-in)" : "stand-in error";
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int* version) {
    *version = gState.driver_version;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = reinterpret_cast<CUcontext>(gState.current_context);
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* dev) {
    if (!gState.current_context) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice) {
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = gState.cc_major; return CUDA_SUCCESS;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = gState.cc_minor; return CUDA_SUCCESS;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = gState.shared_optin; return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (!gState.current_context) return CUDA_ERROR_INVALID_CONTEXT;
    if (gState.load_calls++ == gState.fail_load_at) return CUDA_ERROR_INVALID_IMAGE;
    bool is_cubin = false;
    auto* m = new Module{static_cast<const unsigned char*>(image), 0, gState.current_context, {}};
    m->size = imageSize(m->image, &is_cubin);
    (is_cubin ? gState.cubins : gState.ptx)++;
    gModules.insert(m);
    gState.module_contexts.push_back(gState.current_context);
    ++gState.loaded;
    *module = reinterpret_cast<CUmodule>(m);
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
    auto* m = reinterpret_cast<Module*>(module);
    if (!gModules.erase(m)) {
        ++gState.unload_errors;
        return CUDA_ERROR_INVALID_HANDLE;
    }
    for (auto& f : m->functions) gFunctions.erase(f.get());
    delete m;
    ++gState.unloaded;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* fn, CUmodule module, const char* name) {
    auto* m = reinterpret_cast<Module*>(module);
    if (!gModules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    // The entry's name is in the image (ELF string table or PTX .entry line).
    const size_t length = std::strlen(name);
    bool found = false;
    for (size_t i = 0; !found && i + length <= m->size; ++i) found = std::memcmp(m->image + i, name, length) == 0;
    if (!found) {
        gState.missing_functions.push_back(name);
        return CUDA_ERROR_NOT_FOUND;
    }
    m->functions.push_back(std::make_unique<Function>(Function{name}));
    gFunctions.insert(m->functions.back().get());
    *fn = reinterpret_cast<CUfunction>(m->functions.back().get());
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction fn, CUfunction_attribute attribute, int value) {
    if (!gFunctions.count(reinterpret_cast<Function*>(fn))) return CUDA_ERROR_INVALID_HANDLE;
    if (attribute == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES && value > gState.shared_optin)
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned, unsigned,
                        unsigned shared, CUstream stream, void** params, void**) {
    auto* f = reinterpret_cast<Function*>(fn);
    if (!gFunctions.count(f) || !params) return CUDA_ERROR_INVALID_HANDLE;
    gState.launches.push_back(standin::CudaLaunch{f->name, {gx, gy, gz}, bx, shared, stream});
    return CUDA_SUCCESS;
}

}  // extern "C"
